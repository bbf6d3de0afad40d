// tessera/fed/server.h — the federated server: sessions, rounds, the
// transfer of parameters, and byte counters per link.
//
// Clients join with the enrollment key and get a session token (a random
// 256-bit secret) and a peer key; they then poll for tasks. A round is a
// fit phase and an evaluate phase, each configured and aggregated by the
// strategy (strategy.h). Within a phase the server hands each chosen client
// its task, streams the payload in chunks, and waits for the results until
// every chosen client has answered or been dropped: a client whose process
// died or that stopped sending heartbeats for `client_timeout`, or that
// misses the phase deadline, is dropped and its session ends (a late
// result is refused); the phase completes with the others, and the client
// may join again and take part in the next phase.
//
//   tessera::fed::ServerOptions o;
//   o.enrollment_key = key;                                // shared with the clients
//   tessera::fed::Server server(o, std::make_unique<tessera::fed::FedAvg>(), initial);
//   server.wait_for_clients(4, std::chrono::minutes(2));
//   for (int r = 0; r < 10; ++r) {
//     tessera::fed::RoundRecord rec = server.run_round();
//     std::cout << rec.round << " " << rec.summary.loss << " " << rec.server_bytes() << "\n";
//   }
//   server.shutdown();                                     // clients leave
//
// Security: clients are identified only by the token the server issued;
// tokens and enrollment keys are compared in constant time. A client can
// fetch nothing but its own payload, and another client's expert only with
// a grant the server put in its payload (an HMAC under the owner's peer
// key, checked by the owner), or the server's copy of an expert such a
// grant names. Transport is plain gRPC (loopback or a trusted network):
// wrap it in TLS for anything else.
//
// Thread safety: run_round(), wait_for_clients() and shutdown() are called
// from one thread; the accessors are thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tessera/fed/strategy.h"

namespace tessera::fed {

// Something that happened to a client's task, for tests and progress output.
struct TaskEvent {
  enum class What { kStarted, kFinished, kFailed };
  What what = What::kStarted;
  int client = 0;
  int64_t round = 0;
  bool fit = true;     // fit or evaluate phase
  std::string detail;  // the failure's reason
};

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0: a free port (address() tells which)
  // Clients must present it to join (compared in constant time). Required,
  // at least 16 bytes.
  std::string enrollment_key;
  // Largest gRPC message either side accepts, and the largest piece of a
  // tensor in one message (must leave room for the message's other fields).
  int max_message_bytes = 4 << 20;
  int64_t chunk_bytes = 1 << 20;
  // Clients send a heartbeat this often while a task runs; one that is
  // silent for client_timeout is dropped from its phase.
  std::chrono::milliseconds heartbeat_interval{500};
  std::chrono::milliseconds client_timeout{5000};
  // Deadline of one phase (fit or evaluate), from its start.
  std::chrono::milliseconds phase_timeout{std::chrono::minutes(10)};
  // How long a Poll waits for a task before answering IDLE.
  std::chrono::milliseconds poll_wait{1000};
  // Seed of the per-round client sampling.
  uint64_t seed = 0;
  // Called on the server's threads for every task event (may be empty).
  std::function<void(const TaskEvent&)> on_event;
};

// Bytes counted as serialised protobuf message sizes (payload and headers,
// without HTTP/2 framing).
struct LinkBytes {
  int64_t client_to_server = 0;
  int64_t server_to_client = 0;
};

struct ClientReport {
  int client = 0;
  int64_t num_examples = 0;
  double loss = 0;  // evaluate only
  Config metrics;
};

struct RoundRecord {
  int64_t round = 0;
  std::vector<ClientReport> fit;
  std::vector<Failure> fit_failures;
  std::vector<ClientReport> evaluate;
  std::vector<Failure> evaluate_failures;
  EvaluateSummary summary;
  // Per client, what crossed the server's links during this round.
  std::map<int, LinkBytes> links;
  // Client -> client bytes during this round, as the receivers counted them:
  // (owner, requester) -> bytes.
  std::map<std::pair<int, int>, int64_t> peer_links;
  int64_t fallbacks = 0;  // experts served from the server's copy instead of a peer
  double seconds = 0;

  int64_t server_bytes_in() const;
  int64_t server_bytes_out() const;
  int64_t server_bytes() const { return server_bytes_in() + server_bytes_out(); }
  int64_t peer_bytes() const;
};

class Server {
 public:
  // Starts listening. InvalidArgument for a short enrollment key or chunk
  // size that does not fit the message limit; Unavailable when it cannot
  // listen; errors of strategy->initialize(initial).
  Server(ServerOptions options, std::unique_ptr<Strategy> strategy, const TensorMap& initial);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  std::string address() const;

  // Blocks until `count` clients hold sessions; DeadlineExceeded naming
  // the missing client ids otherwise.
  void wait_for_clients(int count, std::chrono::milliseconds timeout);

  // One round: fit (configure, run, aggregate), then evaluate. The round
  // number is one more than the last.
  RoundRecord run_round();

  // Tells every client to leave at its next poll, waits up to `grace` for
  // them, and stops listening. Idempotent.
  void shutdown(std::chrono::milliseconds grace = std::chrono::seconds(10));

  // Clients holding a session now, sorted.
  std::vector<int> live_clients() const;
  // Totals since start, per client.
  std::map<int, LinkBytes> traffic() const;
  // The strategy, for inspection between rounds.
  const Strategy& strategy() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera::fed
