// The rendezvous: a small TCP store through rank 0 that gets the job's processes together and
// lets them exchange small blobs (the 128-byte ncclUniqueId, settings fingerprints, data hashes).
//
// Rank 0 listens on MASTER_ADDR:MASTER_PORT (an address of its own host); ranks 1..W-1 connect,
// retrying until connect_timeout_s, and introduce themselves (rank, world size). Rank 0 waits for
// all of them (or fails naming the ranks that never arrived), then welcomes each. Star topology:
// every operation goes through rank 0, so it is meant for a few small messages at start-up and
// shutdown, not per step.
//
// Wire format: every message is a 24-byte little-endian header {magic "QTRV", version u16,
// type u16, operation number u32, sender rank u32, payload length u64} and the payload (at most
// 64 MiB). A connection whose first message is not a valid hello (a port scanner, a stray client)
// is dropped and ignored; a peer with another protocol version, another world size, a duplicate
// or out-of-range rank, or a message of the wrong type / operation number (ranks that diverged)
// fails the job with a [dist] error that names the rank. Every read and write has a deadline.
// Operations are collective: every rank calls the same ones in the same order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "dist/tcp.h"

namespace qt::dist {

struct RendezvousOptions {
  int rank = 0;
  int world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 0;
  double connect_timeout_s = 300;  // for every rank to arrive (ranks may start minutes apart)
  double op_timeout_s = 600;       // for one operation (a rank may still be loading its model)
};

class Rendezvous {
 public:
  static constexpr uint16_t kVersion = 1;
  static constexpr uint64_t kMaxPayload = uint64_t(64) << 20;

  // Joins the job: returns once all world_size ranks are connected. World size 1 needs no network.
  explicit Rendezvous(const RendezvousOptions& opts);
  ~Rendezvous();  // closes the connections (without the final barrier of shutdown())
  Rendezvous(const Rendezvous&) = delete;
  Rendezvous& operator=(const Rendezvous&) = delete;

  int rank() const { return opts_.rank; }
  int world_size() const { return opts_.world_size; }

  // Rank 0's `blob` on every rank (the argument is ignored elsewhere).
  std::string broadcast(const std::string& blob);
  // Every rank's blob, indexed by rank, on every rank.
  std::vector<std::string> all_gather(const std::string& blob);
  void barrier();
  // Fails on every rank alike when some rank's blob differs from rank 0's:
  // "[dist] rank 2 has a different <what> than rank 0 (rank 0: ..., rank 2: ...)".
  void check_same(const std::string& what, const std::string& blob);
  // A final barrier (so no rank leaves while another still needs it), then closes.
  void shutdown();

 private:
  enum class Type : uint16_t { hello = 1, welcome = 2, broadcast = 3, gather = 4, gather_reply = 5 };
  struct Header;
  void send_msg(const Fd& s, Type t, const std::string& payload, Clock::time_point deadline, const std::string& who,
                const std::string& what);
  std::string recv_msg(const Fd& s, Type t, int from, Clock::time_point deadline, const std::string& what);
  void accept_all();
  void join();
  std::string op_name(const char* kind) const;

  RendezvousOptions opts_;
  uint32_t op_ = 0;        // operations done so far (the next one's number is op_ + 1)
  bool closed_ = false;
  Fd listener_;            // rank 0
  std::vector<Fd> peers_;  // rank 0: peers_[r] for r >= 1; others: peers_[0] = rank 0
};

}  // namespace qt::dist
