// Connection: the transmission phase of one NBD client, as a state machine on a
// Reactor.
//
// Socket receives, device I/O and socket sends all go through the reactor's
// io_uring, so one thread keeps many requests of many clients in flight:
//  - one receive is in flight at a time; it fills a buffer from which request
//    headers (and small write payloads) are parsed in batches, while large
//    write payloads are received straight into their 4096-aligned buffers;
//  - each request takes a slot (an IoRequest) and is submitted to the device
//    at once; replies go out in completion order (NBD allows any order);
//  - one sendmsg is in flight at a time, so reply bytes never interleave;
//    replies completed while it is queued are gathered into the next one.
// Slots, buffers and the receive buffer are recycled: the steady state makes no
// heap allocation and no syscall outside the ring.
//
// Over TLS (the client sent STARTTLS) the ring moves ciphertext: receives fill
// the TlsSession's input buffer and pump() decrypts from it into the same
// places plaintext would have gone (receive buffer or write payload); replies
// are encrypted, up to kTlsBatch bytes at a time, into the session's flight
// buffer, which one send carries. Encryption and decryption are memory work
// on the reactor thread; GnuTLS never touches the socket.
//
// Closing: on NBD_CMD_DISC, end of stream, protocol error, begin_shutdown() or
// a retired device, the connection stops reading, finishes the requests it has
// read and sends their replies, flushes the device if it wrote anything, closes
// its descriptors, and then (in a later loop iteration) hands itself to
// on_closed, which may destroy it. force_close() cuts the socket first, for
// clients that stopped reading their replies.
//
// Thread-safety: everything runs on the owning reactor's loop thread, except
// the constructor and the const accessors marked as such.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <vector>

#include "common/unique_fd.h"
#include "engine/block_device.h"
#include "engine/reactor.h"
#include "nbd/buffer_pool.h"
#include "nbd/handshake.h"
#include "nbd/request.h"

namespace rpoint::nbd {

struct ConnectionLimits {
  unsigned max_slots = 128;              // requests in flight per connection
  size_t recv_buffer = 128u << 10;       // header/small-payload receive buffer
  size_t buffer_budget = 128u << 20;     // data buffer bytes in use before reading pauses
  size_t buffer_cache = 32u << 20;       // free data buffers kept for reuse
  unsigned max_extents = 512;            // block status descriptors per reply
};

class Connection {
 public:
  using ClosedFn = std::function<void(Connection*)>;

  // in/out may be the same socket (out invalid) or a pipe pair (serve_one).
  Connection(Reactor& reactor, UniqueFd in, UniqueFd out, NegotiatedExport exp,
             ConnectionLimits limits, ClosedFn on_closed);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  void start();
  // Stop reading requests; finish and answer the ones already read; close.
  void begin_shutdown();
  // As begin_shutdown(), and also abort socket I/O (a client not reading).
  void force_close();

  // Any thread.
  Reactor& reactor() const { return reactor_; }
  BlockDevice* device() const { return use_.get(); }
  const std::string& export_name() const { return exp_.name; }
  bool closed() const { return closed_.load(); }
  // True for the first caller only: lets the server post one shutdown per connection.
  bool claim_shutdown();

 private:
  struct Slot;
  class RecvOp : public Reactor::Op {
   public:
    explicit RecvOp(Connection* c) : c_(c) {}
    void complete(int res, uint32_t) override { c_->on_recv(res); }

   private:
    Connection* c_;
  };
  class SendOp : public Reactor::Op {
   public:
    explicit SendOp(Connection* c) : c_(c) {}
    void complete(int res, uint32_t) override { c_->on_send(res); }

   private:
    Connection* c_;
  };
  class FlushOp final : public IoRequest {
   public:
    explicit FlushOp(Connection* c) : c_(c) {}
    void on_done(int result) override { c_->on_final_flush(result); }

   private:
    Connection* c_;
  };

  enum class RecvState { kHeader, kPayload, kSkip };

  // Receive side.
  void pump();
  void parse();
  // Where received plaintext goes next: the receive buffer, or straight into
  // a write payload (*direct).
  void recv_target(char** dest, uint64_t* len, bool* direct);
  void account_recv(uint64_t n, bool direct);
  bool tls_decrypt();  // false: nothing more to decrypt now
  void arm_recv();
  void on_recv(int res);
  bool handle_request(const Request& r);  // false: cannot start now (no slot/budget)
  void payload_complete();
  void stop_reading(const char* why);
  void cancel_recv();

  // Request side.
  Slot* take_slot();
  void release_slot(Slot* s);
  void submit(Slot* s);
  void on_io_done(Slot* s, int result);
  void reply_block_status(Slot* s, int result);

  // Replies.
  void reply_ok(Slot* s);
  void reply_read(Slot* s);
  void reply_error(Slot* s, uint32_t error, const char* message);
  void enqueue(Slot* s);
  void kick_send();
  void gather_send();
  void kick_send_tls();
  void submit_tls_flight();
  void append_to_send(Slot* s);
  void on_send(int res);
  void set_broken(const char* why);

  // Shutdown.
  void maybe_finish();
  void on_final_flush(int result);
  void close_now();

  Reactor& reactor_;
  UniqueFd in_;
  UniqueFd out_;  // invalid: replies go to in_
  int rfd_;
  int wfd_;
  bool recv_socket_ = false;  // recv (socket) rather than read (pipe)
  bool send_socket_ = false;  // sendmsg (socket) rather than writev (pipe)
  NegotiatedExport exp_;
  TlsSession* tls_ = nullptr;  // owned by exp_; null: plaintext
  BlockDevice::Use use_;
  TransmissionContext ctx_;
  ConnectionLimits limits_;
  ClosedFn on_closed_;
  DeviceCaps caps_;
  bool can_append_;  // kernel consumes SQE data at submit (IORING_FEAT_SUBMIT_STABLE)

  // Receive state.
  RecvOp recv_op_{this};
  AlignedBuffer rbuf_;
  size_t rpos_ = 0;
  size_t rend_ = 0;
  RecvState rstate_ = RecvState::kHeader;
  Slot* payload_slot_ = nullptr;
  uint64_t payload_left_ = 0;
  uint64_t skip_left_ = 0;
  bool recv_in_flight_ = false;
  bool recv_direct_ = false;
  bool reading_ = true;
  bool paused_ = false;
  bool pumping_ = false;

  // Slots.
  std::vector<std::unique_ptr<Slot>> slots_;
  std::vector<Slot*> free_slots_;
  BufferPool pool_;
  size_t buffer_bytes_ = 0;
  unsigned io_in_flight_ = 0;

  // Send state.
  SendOp send_op_{this};
  Slot* queue_head_ = nullptr;
  Slot* queue_tail_ = nullptr;
  static constexpr size_t kMaxIov = 256;
  std::array<iovec, kMaxIov> iov_{};
  std::array<Slot*, kMaxIov> send_slots_{};
  size_t send_nslots_ = 0;
  size_t send_niov_ = 0;
  msghdr msg_{};
  bool send_in_flight_ = false;
  bool broken_ = false;
  static constexpr size_t kTlsBatch = 1u << 20;  // plaintext encrypted per send
  uint64_t tls_plain_ = 0;                       // reply bytes the flight in progress carries
  bool tls_bye_ = false;                         // close_notify staged

  // Durability and shutdown.
  uint64_t mutations_ = 0;         // completed writes/trims/zeroes
  uint64_t flushed_mutations_ = 0; // mutations known durable
  FlushOp final_flush_{this};
  bool final_flush_started_ = false;
  bool final_flush_done_ = false;
  std::atomic<bool> closed_{false};
  std::atomic<bool> shutdown_claimed_{false};
};

}  // namespace rpoint::nbd
