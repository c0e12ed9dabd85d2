// Boost.Beast and Asio's Unix sockets, included with GCC's -Wmaybe-uninitialized
// silenced: GCC 12 with -fsanitize=address reports a false positive inside
// beast/http/impl/basic_parser.hpp (a boost::optional it cannot see through),
// which -Werror would turn into a failed sanitizer build. Include this instead
// of the Beast headers.
#pragma once

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#pragma GCC diagnostic pop
