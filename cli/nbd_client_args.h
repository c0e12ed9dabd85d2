// The nbd-client(8) arguments that reach an NBD URI: Debian's nbd-client 3.24
// takes no URI, so `rpoint access grant --nbd-client` turns the grant's
// accessSAS into "-N NAME HOST PORT" or "-N NAME -unix PATH" (docs/api.md
// "Access grants").
//
// Thread-safety: pure function.
#pragma once

#include <string>

#include "common/status.h"

namespace rpoint::cli {

// nbd://HOST:PORT/NAME          -> "-N NAME HOST PORT"
// nbds://HOST:PORT/NAME         -> "-N NAME HOST PORT -enable-tls"
// nbd+unix:///NAME?socket=PATH  -> "-N NAME -unix PATH" (nbds+unix: + " -enable-tls")
// An IPv6 host "[::1]" is given bare ("::1"); the socket is percent-decoded. TLS
// URIs need the client's -cacertfile (and -certfile/-keyfile when the server
// asks for a certificate) added by the caller: only it knows where they are.
// InvalidArgument for any other shape, and for a name or path that would not
// survive the shell's word splitting (whitespace) or would be read as an option.
Result<std::string> NbdClientArgs(const std::string& uri);

}  // namespace rpoint::cli
