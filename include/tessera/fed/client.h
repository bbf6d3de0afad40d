// tessera/fed/client.h — the federated client runtime, and the launcher
// that starts clients as processes.
//
// A ClientApp owns a model and private data and knows how to train and
// evaluate it (Flower's client fit/evaluate); the Client runtime does the
// rest: it joins the server, polls for tasks, loads what the server sends,
// personalises experts from its peers (FedMoE-DA), uploads results, serves
// its own experts to peers that hold a grant, keeps the session alive with
// heartbeats, joins again after a dropped session, and saves its model
// after every fit so that a restarted process resumes where it was.
//
//   class MyApp : public tessera::fed::ClientApp { ... };
//   MyApp app;
//   tessera::fed::ClientOptions o;
//   o.server_address = "127.0.0.1:50051";
//   o.client_id = 3;
//   o.enrollment_key = key;
//   tessera::fed::Client client(o, app);
//   client.run();                      // until the server says SHUTDOWN
//
// Processes: a ClientLauncher starts N client processes of one program
// (by default the running one); that program calls run_client_if_spawned()
// first thing in main(), which turns the spawned copies into clients:
//
//   int main(int argc, char** argv) {
//     if (auto code = tessera::fed::run_client_if_spawned(tessera::fed::language_model_app))
//       return *code;
//     ... server side: tessera::fed::Server + tessera::fed::ClientLauncher ...
//   }
//
// Peer fetches: an expert named in the payload is fetched from its owner
// with the grant the server issued, retried on UNAVAILABLE / deadline, and
// taken from the server's copy when the owner cannot serve it; a source
// neither can serve is left out and the remaining weights renormalised
// (counted in the task's "fetch_failures" metric).
//
// Thread safety: Client::run() runs on one thread; stop() and traffic()
// may be called from any thread. ClientApp methods are called from the
// thread running run(), one at a time; parameters() may be read by the
// runtime's threads while fit() runs, and must stay the same tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tessera/core/subprocess.h"
#include "tessera/fed/strategy.h"

namespace tessera::fed {

struct TaskInfo {
  int64_t round = 0;
  bool fit = true;
  Config config;  // the strategy's fit or evaluate config
};

struct FitOutcome {
  int64_t num_examples = 0;  // the weight of this client in averages
  Config metrics;
};

struct EvaluateOutcome {
  int64_t num_examples = 0;
  double loss = 0;
  Config metrics;
};

class ClientApp {
 public:
  virtual ~ClientApp() = default;
  // The model's parameters by name, the live tensors (the runtime copies
  // received values into them in place, without autograd).
  virtual std::vector<std::pair<std::string, at::Tensor>> parameters() = 0;
  // Trains on private data from the current parameters.
  virtual FitOutcome fit(const TaskInfo& task) = 0;
  // Held-out loss of the current parameters.
  virtual EvaluateOutcome evaluate(const TaskInfo& task) = 0;
};

struct ClientOptions {
  std::string server_address;
  int client_id = 0;
  std::string enrollment_key;
  // Where this client's Peer service listens (port 0: a free one).
  std::string peer_host = "127.0.0.1";
  int max_message_bytes = 4 << 20;
  // The model is saved here after every fit and restored at start (empty:
  // nothing saved).
  std::string state_dir;
  // Peer fetches: attempts per owner before the server's copy, the
  // deadline of each, and the wait before retry k (k * retry_backoff).
  int fetch_attempts = 3;
  std::chrono::milliseconds fetch_timeout{10000};
  std::chrono::milliseconds retry_backoff{200};
  // Deadline of downloads and uploads.
  std::chrono::milliseconds transfer_timeout{std::chrono::minutes(5)};
  // How long the server may be unreachable before run() gives up.
  std::chrono::milliseconds server_timeout{30000};
};

// What crossed this client's links since it started (serialised message
// sizes, as the server counts them).
struct ClientTraffic {
  int64_t to_server = 0;
  int64_t from_server = 0;
  std::map<int, int64_t> from_peer;  // owner -> bytes received
  std::map<int, int64_t> to_peer;    // requester -> bytes served
  int64_t fallbacks = 0;             // experts taken from the server's copy
};

class Client {
 public:
  // Starts the Peer service and restores a saved model (state_dir).
  // InvalidArgument for a missing server address or enrollment key;
  // DataLoss for a corrupt saved model.
  Client(ClientOptions options, ClientApp& app);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Runs until the server says SHUTDOWN or stop() is called. Unavailable
  // when the server stays unreachable for server_timeout; PermissionDenied
  // surfaces as FailedPrecondition naming the refused join.
  void run();
  void stop();
  std::string peer_address() const;
  ClientTraffic traffic() const;
  // True when the constructor restored a saved model.
  bool restored() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Builds a client's app from the spec text the launcher passed it.
using AppFactory =
    std::function<std::unique_ptr<ClientApp>(const std::string& spec, int client_id)>;

struct LauncherOptions {
  std::string program;                    // empty: this program
  std::vector<std::string> program_args;  // argv[1...]
  std::string server_address;
  std::string enrollment_key;
  // Key file, specs, state folders and logs go here (created); required.
  std::string work_dir;
  // One spec per client; client i gets specs[i] and id i.
  std::vector<std::string> specs;
  int threads_per_client = 1;  // LibTorch intra-op threads
  int max_message_bytes = 4 << 20;
  std::map<std::string, std::string> env;  // extra variables for the clients
};

// Client processes. Each runs `program` with the client's variables;
// stdout and stderr go to work_dir/client-<i>.<start>.log. Processes die
// with this one. Thread-compatible.
class ClientLauncher {
 public:
  explicit ClientLauncher(LauncherOptions options);  // starts every client
  ~ClientLauncher();                                 // kills those still running
  int size() const;
  bool running(int client);
  pid_t pid(int client) const;
  // SIGKILL, reaped.
  void kill(int client);
  // Starts a client that is not running again (it restores its saved
  // model and joins); FailedPrecondition while it runs.
  void restart(int client);
  // Waits for every client to exit (after the server's shutdown); kills
  // the ones still running at the timeout. Returns how each ended.
  std::vector<ExitStatus> wait(std::chrono::milliseconds timeout);
  std::string log_path(int client) const;

 private:
  void spawn(int client);
  LauncherOptions options_;
  std::vector<Subprocess> processes_;
  std::vector<int> starts_;
};

// In a program a ClientLauncher starts: runs the client the environment
// describes with the app `factory` builds from its spec, and returns the
// exit code main() should return (0 after SHUTDOWN, 1 after an error,
// which is logged). std::nullopt when this process was not started as a
// client.
std::optional<int> run_client_if_spawned(const AppFactory& factory);

}  // namespace tessera::fed
