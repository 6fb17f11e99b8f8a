// The rendezvous store through rank 0 (see rendezvous.h for the protocol).
#include "dist/rendezvous.h"

#include <algorithm>
#include <cstdio>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"

namespace qt::dist {
namespace {

constexpr uint32_t kMagic = 0x56525451;  // "QTRV" little-endian
constexpr size_t kHeaderBytes = 24;

void put(unsigned char* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
uint64_t get(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(p[i]) << (8 * i);
  return v;
}

std::string pack(const std::vector<std::string>& items) {
  std::string out(4, '\0');
  put(reinterpret_cast<unsigned char*>(out.data()), items.size(), 4);
  for (const auto& s : items) {
    unsigned char len[8];
    put(len, s.size(), 8);
    out.append(reinterpret_cast<const char*>(len), 8);
    out += s;
  }
  return out;
}

std::vector<std::string> unpack(const std::string& in, size_t expect) {
  const auto* p = reinterpret_cast<const unsigned char*>(in.data());
  size_t pos = 4;
  if (in.size() < 4 || get(p, 4) != expect) fail("dist", "rank 0 sent a malformed all_gather reply");
  std::vector<std::string> out(expect);
  for (auto& s : out) {
    if (pos + 8 > in.size()) fail("dist", "rank 0 sent a truncated all_gather reply");
    const uint64_t n = get(p + pos, 8);
    pos += 8;
    if (n > in.size() - pos) fail("dist", "rank 0 sent a truncated all_gather reply");
    s = in.substr(pos, size_t(n));
    pos += size_t(n);
  }
  return out;
}

// A blob as it appears in an error: itself when short and printable, else its size and head.
std::string show(const std::string& b) {
  const bool printable = std::all_of(b.begin(), b.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
  if (printable && b.size() <= 80) return "\"" + b + "\"";
  std::string hex;
  for (size_t i = 0; i < std::min<size_t>(b.size(), 8); ++i) hex += fmt::format("{:02x}", uint8_t(b[i]));
  return fmt::format("{} bytes {}...", b.size(), hex);
}

std::string rank_name(int r) { return fmt::format("rank {}", r); }

}  // namespace

struct Rendezvous::Header {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t type = 0;
  uint32_t op = 0;
  uint32_t rank = 0;
  uint64_t len = 0;

  void encode(unsigned char* p) const {
    put(p, magic, 4);
    put(p + 4, version, 2);
    put(p + 6, type, 2);
    put(p + 8, op, 4);
    put(p + 12, rank, 4);
    put(p + 16, len, 8);
  }
  static Header decode(const unsigned char* p) {
    Header h;
    h.magic = uint32_t(get(p, 4));
    h.version = uint16_t(get(p + 4, 2));
    h.type = uint16_t(get(p + 6, 2));
    h.op = uint32_t(get(p + 8, 4));
    h.rank = uint32_t(get(p + 12, 4));
    h.len = get(p + 16, 8);
    return h;
  }
};

Rendezvous::Rendezvous(const RendezvousOptions& opts) : opts_(opts) {
  if (opts_.world_size < 1 || opts_.rank < 0 || opts_.rank >= opts_.world_size)
    fail("dist", "rank {} of a world of {}: the rank must be in [0, world size)", opts_.rank, opts_.world_size);
  if (opts_.world_size == 1) return;
  if (opts_.master_port < 1 || opts_.master_port > 65535) fail("dist", "MASTER_PORT {}: must be in [1, 65535]", opts_.master_port);
  if (opts_.rank == 0) {
    listener_ = tcp_listen(opts_.master_addr, opts_.master_port, std::max(16, opts_.world_size));
    peers_.resize(size_t(opts_.world_size));
    accept_all();
    listener_.reset();  // late or stray connections are refused from now on
  } else {
    peers_.resize(1);
    join();
  }
}

Rendezvous::~Rendezvous() = default;

std::string Rendezvous::op_name(const char* kind) const { return fmt::format("{} #{}", kind, op_); }

void Rendezvous::send_msg(const Fd& s, Type t, const std::string& payload, Clock::time_point deadline,
                          const std::string& who, const std::string& what) {
  QT_ASSERT(payload.size() <= kMaxPayload, "rendezvous payload of {} bytes", payload.size());
  Header h;
  h.type = uint16_t(t);
  h.op = op_;
  h.rank = uint32_t(opts_.rank);
  h.len = payload.size();
  unsigned char buf[kHeaderBytes];
  h.encode(buf);
  send_all(s, buf, kHeaderBytes, deadline, who, what);
  send_all(s, payload.data(), payload.size(), deadline, who, what);
}

std::string Rendezvous::recv_msg(const Fd& s, Type t, int from, Clock::time_point deadline, const std::string& what) {
  const std::string who = rank_name(from);
  unsigned char buf[kHeaderBytes];
  recv_all(s, buf, kHeaderBytes, deadline, who, what);
  const Header h = Header::decode(buf);
  if (h.magic != kMagic) fail("dist", "{} sent bytes that are not a rendezvous message during {}", who, what);
  if (h.version != kVersion)
    fail("dist", "{} speaks rendezvous protocol version {}, this process {}: run the same qwentune binary on every rank",
         who, h.version, kVersion);
  if (h.type != uint16_t(t) || h.op != op_ || h.rank != uint32_t(from))
    fail("dist", "{} is out of step: expected message type {} of operation {} from rank {}, got type {} of operation {} "
         "from rank {} during {} (the ranks took different paths: are their settings the same?)",
         who, uint16_t(t), op_, from, h.type, h.op, h.rank, what);
  if (h.len > kMaxPayload) fail("dist", "{} announced a {} byte message during {} (limit {})", who, h.len, what, kMaxPayload);
  std::string payload(size_t(h.len), '\0');
  recv_all(s, payload.data(), payload.size(), deadline, who, what);
  return payload;
}

void Rendezvous::accept_all() {
  const auto deadline = deadline_after(opts_.connect_timeout_s);
  const int want = opts_.world_size - 1;
  for (int joined = 0; joined < want;) {
    Fd s = tcp_accept(listener_, deadline);
    if (!s.valid()) {
      std::vector<int> missing;
      for (int r = 1; r < opts_.world_size; ++r)
        if (!peers_[size_t(r)].valid()) missing.push_back(r);
      fail("dist", "rank{} {} did not join within {} s (rank 0 listens on {}:{}); were they started, with the same "
           "MASTER_ADDR, MASTER_PORT and WORLD_SIZE={}?", missing.size() > 1 ? "s" : "", fmt::join(missing, ", "),
           opts_.connect_timeout_s, opts_.master_addr, opts_.master_port, opts_.world_size);
    }
    // A stray client that sends nothing useful within a few seconds is dropped; ranks send their hello at once.
    const auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
    unsigned char buf[kHeaderBytes + 4];
    Header h;
    try {
      recv_all(s, buf, kHeaderBytes, hello_deadline, "a new connection", "joining");
      h = Header::decode(buf);
      if (h.magic == kMagic && h.type == uint16_t(Type::hello) && h.len == 4 && h.op == 0)
        recv_all(s, buf + kHeaderBytes, 4, hello_deadline, "a new connection", "joining");
    } catch (const Error&) {
      continue;  // silent or gone before its hello was complete
    }
    if (h.magic == kMagic && h.version != kVersion)
      fail("dist", "rank {} speaks rendezvous protocol version {}, rank 0 {}: run the same qwentune binary on every rank",
           h.rank, h.version, kVersion);
    if (h.magic != kMagic || h.type != uint16_t(Type::hello) || h.len != 4 || h.op != 0) {
      std::fprintf(stderr, "qwentune: warning: [dist] ignored a connection to %s:%d that is not a qwentune rank\n",
                   opts_.master_addr.c_str(), opts_.master_port);
      continue;
    }
    const uint64_t world = get(buf + kHeaderBytes, 4);
    if (h.rank < 1 || h.rank >= uint32_t(opts_.world_size))
      fail("dist", "a process joined as rank {}, outside the world of {} of rank 0 (world size {} on that process)",
           h.rank, opts_.world_size, world);
    if (world != uint64_t(opts_.world_size))
      fail("dist", "rank {} was started with world size {}, rank 0 with {}", h.rank, world, opts_.world_size);
    if (peers_[h.rank].valid()) fail("dist", "two processes joined as rank {}", h.rank);
    peers_[h.rank] = std::move(s);
    ++joined;
  }
  for (int r = 1; r < opts_.world_size; ++r)
    send_msg(peers_[size_t(r)], Type::welcome, "", deadline_after(opts_.op_timeout_s), rank_name(r), "joining");
}

void Rendezvous::join() {
  peers_[0] = tcp_connect(opts_.master_addr, opts_.master_port, deadline_after(opts_.connect_timeout_s),
                         rank_name(opts_.rank));
  // Rank 0 waits up to connect_timeout_s for the others and reports the missing ones; this rank
  // waits a little longer for the welcome so that rank 0's message, not a timeout here, is the news.
  const auto deadline = deadline_after(opts_.connect_timeout_s + 5);
  std::string world(4, '\0');
  put(reinterpret_cast<unsigned char*>(world.data()), uint64_t(opts_.world_size), 4);
  send_msg(peers_[0], Type::hello, world, deadline, "rank 0", "joining");
  recv_msg(peers_[0], Type::welcome, 0, deadline, "joining");
}

std::string Rendezvous::broadcast(const std::string& blob) {
  QT_ASSERT(!closed_, "rendezvous used after shutdown");
  ++op_;
  if (opts_.world_size == 1) return blob;
  const std::string what = op_name("broadcast");
  const auto deadline = deadline_after(opts_.op_timeout_s);
  if (opts_.rank != 0) return recv_msg(peers_[0], Type::broadcast, 0, deadline, what);
  for (int r = 1; r < opts_.world_size; ++r) send_msg(peers_[size_t(r)], Type::broadcast, blob, deadline, rank_name(r), what);
  return blob;
}

std::vector<std::string> Rendezvous::all_gather(const std::string& blob) {
  QT_ASSERT(!closed_, "rendezvous used after shutdown");
  ++op_;
  if (opts_.world_size == 1) return {blob};
  const std::string what = op_name("all_gather");
  const auto deadline = deadline_after(opts_.op_timeout_s);
  if (opts_.rank != 0) {
    send_msg(peers_[0], Type::gather, blob, deadline, "rank 0", what);
    return unpack(recv_msg(peers_[0], Type::gather_reply, 0, deadline, what), size_t(opts_.world_size));
  }
  std::vector<std::string> all(size_t(opts_.world_size));
  all[0] = blob;
  for (int r = 1; r < opts_.world_size; ++r) all[size_t(r)] = recv_msg(peers_[size_t(r)], Type::gather, r, deadline, what);
  const std::string packed = pack(all);
  if (packed.size() > kMaxPayload) fail("dist", "all_gather of {} bytes exceeds the rendezvous limit", packed.size());
  for (int r = 1; r < opts_.world_size; ++r) send_msg(peers_[size_t(r)], Type::gather_reply, packed, deadline, rank_name(r), what);
  return all;
}

void Rendezvous::barrier() { all_gather(""); }

void Rendezvous::check_same(const std::string& what, const std::string& blob) {
  const std::vector<std::string> all = all_gather(blob);
  std::vector<int> differ;
  for (int r = 1; r < opts_.world_size; ++r)
    if (all[size_t(r)] != all[0]) differ.push_back(r);
  if (differ.empty()) return;
  const int r = differ[0];
  if (differ.size() == 1)
    fail("dist", "rank {} has a different {} than rank 0 (rank 0: {}, rank {}: {})", r, what, show(all[0]), r,
         show(all[size_t(r)]));
  fail("dist", "ranks {} have a different {} than rank 0 (rank 0: {}, rank {}: {})", fmt::join(differ, ", "), what,
       show(all[0]), r, show(all[size_t(r)]));
}

void Rendezvous::shutdown() {
  if (closed_) return;
  barrier();
  peers_.clear();
  listener_.reset();
  closed_ = true;
}

}  // namespace qt::dist
