// The runtime in one process: a Server and Client objects on threads with a
// small deterministic app, over real gRPC on loopback. Chunked transfers
// past the message limit, the security checks, peer-to-peer personalisation
// end to end, the fallback to the server's copy, and byte counters.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/fed/client.h"
#include "tessera/fed/federation.grpc.pb.h"
#include "tessera/fed/server.h"
#include "tessera/rpc/rpc.h"

namespace tessera::fed {
namespace {

const std::string kKey = "0123456789abcdef0123456789abcdef";

// Parameters named like a 1-layer Mixtral with E experts (or a dense blob).
TensorMap toy_model(int64_t experts, int64_t hidden, uint64_t seed) {
  at::manual_seed(seed);
  TensorMap m;
  m["model.embed_tokens.weight"] = at::randn({8, hidden});
  if (experts > 0) {
    const std::string p = "model.layers.0.block_sparse_moe.";
    m[p + "gate.weight"] = at::randn({experts, hidden});
    for (int64_t e = 0; e < experts; ++e) {
      m[p + "experts." + std::to_string(e) + ".w1.weight"] = at::randn({6, hidden});
      m[p + "experts." + std::to_string(e) + ".w2.weight"] = at::randn({hidden, 6});
    }
  }
  return m;
}

// What each toy client held right after its fit, by (client, round).
struct FitLog {
  std::mutex mu;
  std::map<std::pair<int, int64_t>, TensorMap> after_fit;
};

// Fit moves every parameter by a seeded random step (different per client
// and round); evaluate reports the mean square of the parameters.
class ToyApp final : public ClientApp {
 public:
  ToyApp(int client, const TensorMap& shape, FitLog* log) : client_(client), log_(log) {
    for (const auto& [n, t] : shape) params_.emplace_back(n, at::zeros_like(t));
  }
  std::vector<std::pair<std::string, at::Tensor>> parameters() override { return params_; }
  FitOutcome fit(const TaskInfo& task) override {
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(
        static_cast<uint64_t>(client_ * 1000 + task.round));
    TensorMap snapshot;
    for (auto& [n, t] : params_) {
      t.add_(at::normal(0.0, 0.3, t.sizes(), gen));
      snapshot[n] = t.clone();
    }
    if (log_) {
      std::lock_guard<std::mutex> lock(log_->mu);
      log_->after_fit[{client_, task.round}] = snapshot;
    }
    return {100, {{"fit_metric", 1.0}}};
  }
  EvaluateOutcome evaluate(const TaskInfo& task) override {
    double sq = 0;
    for (auto& [n, t] : params_) sq += t.pow(2).mean().item<double>();
    return {10, sq, {}};
  }
  TensorMap values() {
    TensorMap m;
    for (auto& [n, t] : params_) m[n] = t.clone();
    return m;
  }

 private:
  int client_;
  FitLog* log_;
  std::vector<std::pair<std::string, at::Tensor>> params_;
};

struct RunningClient {
  std::unique_ptr<ToyApp> app;
  std::unique_ptr<Client> client;
  std::thread thread;
  std::string error;
};

// Starts clients 0..n-1 on threads.
std::vector<std::unique_ptr<RunningClient>> start_clients(const Server& server, int n,
                                                          const TensorMap& shape, FitLog* log,
                                                          int max_message = 4 << 20) {
  std::vector<std::unique_ptr<RunningClient>> out;
  for (int c = 0; c < n; ++c) {
    auto rc = std::make_unique<RunningClient>();
    rc->app = std::make_unique<ToyApp>(c, shape, log);
    ClientOptions o;
    o.server_address = server.address();
    o.client_id = c;
    o.enrollment_key = kKey;
    o.max_message_bytes = max_message;
    o.fetch_attempts = 2;
    o.retry_backoff = std::chrono::milliseconds(20);
    o.fetch_timeout = std::chrono::seconds(2);
    rc->client = std::make_unique<Client>(o, *rc->app);
    RunningClient* raw = rc.get();
    rc->thread = std::thread([raw] {
      try {
        raw->client->run();
      } catch (const std::exception& e) {
        raw->error = e.what();
      }
    });
    out.push_back(std::move(rc));
  }
  return out;
}

void finish(Server& server, std::vector<std::unique_ptr<RunningClient>>& clients) {
  server.shutdown(std::chrono::seconds(10));
  for (auto& c : clients) {
    if (c->thread.joinable()) c->thread.join();
    EXPECT_EQ(c->error, "");
  }
}

ServerOptions server_options() {
  ServerOptions o;
  o.enrollment_key = kKey;
  o.client_timeout = std::chrono::seconds(5);
  o.poll_wait = std::chrono::milliseconds(200);
  o.heartbeat_interval = std::chrono::milliseconds(200);
  return o;
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

TEST(Runtime, TensorLargerThanTheMessageLimitTransfers) {
  TensorMap initial;
  at::manual_seed(0);
  initial["big.weight"] = at::randn({512, 512});  // 1 MiB of float32
  ServerOptions so = server_options();
  so.max_message_bytes = 64 << 10;
  so.chunk_bytes = 16 << 10;
  Server server(so, std::make_unique<FedAvg>(), initial);

  // The limit binds: one message of that size is refused.
  {
    auto stub = proto::Coordinator::NewStub(rpc::channel(server.address(), {8 << 20}));
    proto::JoinRequest req;
    req.set_client_id(0);
    req.set_enrollment_key(std::string(1 << 20, 'k'));
    req.set_peer_address("127.0.0.1:1");
    proto::JoinReply reply;
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    EXPECT_EQ(stub->Join(&ctx, req, &reply).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  }

  auto clients = start_clients(server, 2, initial, nullptr, 64 << 10);
  server.wait_for_clients(2, std::chrono::seconds(20));
  const RoundRecord rec = server.run_round();
  EXPECT_EQ(rec.fit.size(), 2u);
  EXPECT_TRUE(rec.fit_failures.empty());
  ASSERT_EQ(rec.evaluate.size(), 2u);
  // Both clients hold the averaged model after the evaluate phase's download.
  const auto& global = dynamic_cast<const FedAvg&>(server.strategy()).global().at("big.weight");
  for (auto& c : clients) EXPECT_EQ(max_diff(c->app->values().at("big.weight"), global), 0.0);
  // The average of the two uploads, each the initial value plus that
  // client's step.
  // Bytes: each client downloaded the model twice (bootstrap + evaluate)
  // and uploaded it once.
  for (const auto& [c, l] : rec.links) {
    EXPECT_GT(l.server_to_client, 2 * (1 << 20));
    EXPECT_LT(l.server_to_client, 2 * (1 << 20) + 64 * 1024);
    EXPECT_GT(l.client_to_server, 1 << 20);
    EXPECT_LT(l.client_to_server, (1 << 20) + 64 * 1024);
  }
  for (auto& c : clients) {
    const ClientTraffic t = c->client->traffic();
    EXPECT_GT(t.from_server, 2 * (1 << 20));
  }
  finish(server, clients);
}

TEST(Runtime, AveragesWhatTheClientsTrained) {
  FitLog log;
  const TensorMap initial = toy_model(2, 8, 1);
  Server server(server_options(), std::make_unique<FedAvg>(), initial);
  auto clients = start_clients(server, 3, initial, &log);
  server.wait_for_clients(3, std::chrono::seconds(20));
  for (int r = 1; r <= 2; ++r) {
    const RoundRecord rec = server.run_round();
    EXPECT_EQ(rec.fit.size(), 3u);
    EXPECT_EQ(rec.round, r);
  }
  const TensorMap& global = dynamic_cast<const FedAvg&>(server.strategy()).global();
  for (const auto& [name, t] : global) {
    at::Tensor mean = at::zeros_like(t);
    for (int c = 0; c < 3; ++c) mean += log.after_fit.at({c, 2}).at(name) / 3.0;
    EXPECT_LT(max_diff(t, mean), 1e-5) << name;
  }
  finish(server, clients);
}

TEST(Runtime, FedMoEDAPersonalisesFromPeersEndToEnd) {
  FitLog log;
  const TensorMap initial = toy_model(4, 8, 2);
  FedMoEDAOptions o;
  o.domain_aware.neighbours = 3;
  o.domain_aware.temperature = 0.5;
  Server server(server_options(), std::make_unique<FedMoEDA>(o), initial);
  auto clients = start_clients(server, 3, initial, &log);
  server.wait_for_clients(3, std::chrono::seconds(20));
  const RoundRecord r1 = server.run_round();
  const auto& da = dynamic_cast<const FedMoEDA&>(server.strategy());
  ASSERT_EQ(da.refreshed_round(), 1);

  // After round 1's evaluate download every client's experts are the
  // weighted sums of the post-fit experts the matrix names.
  for (int c = 0; c < 3; ++c) {
    const TensorMap now = clients[c]->app->values();
    for (const ExpertMix& mix : da.mixes_for(c)) {
      for (const std::string& name : da.partition().expert(mix.layer, mix.expert)) {
        const std::string suffix = parse_expert_parameter(name)->suffix;
        at::Tensor want = at::zeros_like(now.at(name));
        for (const ExpertSource& s : mix.sources) {
          const std::string src =
              "model.layers.0.block_sparse_moe.experts." + std::to_string(s.expert) + "." + suffix;
          want += s.weight * log.after_fit.at({s.owner, 1}).at(src);
        }
        EXPECT_LT(max_diff(now.at(name), want), 1e-5) << "client " << c << " " << name;
      }
    }
    // Shared parts are the server's.
    for (const std::string& name : da.partition().shared) {
      EXPECT_EQ(max_diff(now.at(name), da.shared().at(name)), 0.0) << name;
    }
  }
  // Bytes between clients, as receivers and senders counted them.
  EXPECT_GT(r1.peer_bytes(), 0);
  EXPECT_EQ(r1.fallbacks, 0);
  int64_t served = 0;
  for (auto& c : clients) {
    for (const auto& [req, b] : c->client->traffic().to_peer) served += b;
  }
  EXPECT_EQ(served, r1.peer_bytes());
  for (const auto& [link, bytes] : r1.peer_links) EXPECT_NE(link.first, link.second);

  // No expert ever passed through the server after the bootstrap: round 2
  // moves only the shared parts (and small headers) through it.
  const RoundRecord r2 = server.run_round();
  int64_t shared_bytes = 0;
  for (const std::string& n : da.partition().shared) shared_bytes += initial.at(n).numel() * 4;
  for (const auto& [c, l] : r2.links) {
    EXPECT_LT(l.server_to_client, 2 * shared_bytes + 8192) << "client " << c;
    EXPECT_LT(l.client_to_server, shared_bytes + 8192) << "client " << c;
  }
  EXPECT_GT(r2.peer_bytes(), 0);
  finish(server, clients);
}

TEST(Runtime, GonePeerFallsBackToTheServersCopy) {
  const TensorMap initial = toy_model(2, 8, 3);
  FedMoEDAOptions o;
  o.domain_aware.neighbours = 5;  // every expert of every client
  Server server(server_options(), std::make_unique<FedMoEDA>(o), initial);
  auto clients = start_clients(server, 3, initial, nullptr);
  server.wait_for_clients(3, std::chrono::seconds(20));
  server.run_round();
  // Client 2 leaves and its peer service goes away.
  clients[2]->client->stop();
  clients[2]->thread.join();
  clients[2]->client.reset();
  while (server.live_clients().size() != 2)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const RoundRecord r2 = server.run_round();
  EXPECT_EQ(r2.fit.size(), 2u);
  EXPECT_EQ(r2.evaluate.size(), 2u);
  EXPECT_TRUE(r2.evaluate_failures.empty());
  // Client 2's two experts, fetched from the server by clients 0 and 1.
  EXPECT_EQ(r2.fallbacks, 4);
  int64_t reported = 0;
  for (const ClientReport& r : r2.evaluate)
    reported += static_cast<int64_t>(r.metrics.at("fallbacks"));
  EXPECT_EQ(reported, 4);
  for (const auto& [link, bytes] : r2.peer_links) EXPECT_NE(link.first, 2);
  clients.pop_back();
  finish(server, clients);
}

TEST(Runtime, RefusesWhatAClientMayNotDo) {
  const TensorMap initial = toy_model(2, 8, 4);
  FedMoEDAOptions o;
  o.domain_aware.neighbours = 5;
  Server server(server_options(), std::make_unique<FedMoEDA>(o), initial);
  auto stub = proto::Coordinator::NewStub(rpc::channel(server.address(), {}));
  auto call_join = [&](int id, const std::string& key, proto::JoinReply* reply) {
    proto::JoinRequest req;
    req.set_client_id(id);
    req.set_enrollment_key(key);
    req.set_peer_address("127.0.0.1:1");
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    return stub->Join(&ctx, req, reply).error_code();
  };
  proto::JoinReply reply;
  EXPECT_EQ(call_join(0, "wrong key, same length 32 bytes!", &reply),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(call_join(0, "", &reply), grpc::StatusCode::PERMISSION_DENIED);
  {
    proto::PollRequest req;
    req.set_token(std::string(64, 'a'));
    proto::Task task;
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    EXPECT_EQ(stub->Poll(&ctx, req, &task).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }

  auto clients = start_clients(server, 2, initial, nullptr);
  server.wait_for_clients(2, std::chrono::seconds(20));
  server.run_round();

  // An enrolled client without a grant gets no expert, from the owner or
  // from the server, and no other client's payload.
  ASSERT_EQ(call_join(7, kKey, &reply), grpc::StatusCode::OK);
  const std::string rogue_token = reply.token();
  auto peer = proto::Peer::NewStub(rpc::channel(clients[0]->client->peer_address(), {}));
  auto fetch_peer = [&](int requester, const std::string& grant) {
    proto::ExpertRequest req;
    req.set_requester(requester);
    req.set_owner(0);
    req.set_layer(0);
    req.set_expert(1);
    req.set_version(1);
    req.set_grant(grant);
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    auto reader = peer->FetchExpert(&ctx, req);
    proto::Chunk chunk;
    int chunks = 0;
    while (reader->Read(&chunk)) ++chunks;
    EXPECT_EQ(chunks, 0);
    return reader->Finish().error_code();
  };
  EXPECT_EQ(fetch_peer(7, ""), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(fetch_peer(7, std::string(32, 'g')), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(fetch_peer(1, std::string(32, 'g')), grpc::StatusCode::PERMISSION_DENIED);
  {
    proto::ExpertRequest req;
    req.set_token(rogue_token);
    req.set_requester(7);
    req.set_owner(0);
    req.set_layer(0);
    req.set_expert(1);
    req.set_version(1);
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    auto reader = stub->FetchExpertCopy(&ctx, req);
    proto::Chunk chunk;
    EXPECT_FALSE(reader->Read(&chunk));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  for (int64_t task_id : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{4}}) {
    proto::DownloadRequest req;
    req.set_token(rogue_token);
    req.set_task_id(task_id);
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    auto reader = stub->Download(&ctx, req);
    proto::Chunk chunk;
    EXPECT_FALSE(reader->Read(&chunk));
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  }
  {
    proto::LeaveRequest req;
    req.set_token(rogue_token);
    proto::LeaveReply r;
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(5));
    EXPECT_TRUE(stub->Leave(&ctx, req, &r).ok());
  }
  finish(server, clients);
}

TEST(Runtime, ResultsOfDroppedClientsAreRefusedAndTheyRejoin) {
  const TensorMap initial = toy_model(2, 8, 5);
  ServerOptions so = server_options();
  so.client_timeout = std::chrono::milliseconds(1500);
  std::vector<TaskEvent> events;
  std::mutex mu;
  so.on_event = [&](const TaskEvent& e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(e);
  };
  Server server(so, std::make_unique<LocalExperts>(), initial);
  auto clients = start_clients(server, 2, initial, nullptr);
  server.wait_for_clients(2, std::chrono::seconds(20));
  // A third session that never polls: chosen for the round, dropped for
  // silence, and the round completes with the other two.
  auto stub = proto::Coordinator::NewStub(rpc::channel(server.address(), {}));
  proto::JoinRequest req;
  req.set_client_id(5);
  req.set_enrollment_key(kKey);
  req.set_peer_address("127.0.0.1:1");
  proto::JoinReply reply;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Join(&ctx, req, &reply).ok());
  }
  const RoundRecord rec = server.run_round();
  EXPECT_EQ(rec.fit.size(), 2u);
  ASSERT_EQ(rec.fit_failures.size(), 1u);
  EXPECT_EQ(rec.fit_failures[0].client, 5);
  EXPECT_NE(rec.fit_failures[0].reason.find("no heartbeat"), std::string::npos)
      << rec.fit_failures[0].reason;
  EXPECT_EQ(rec.evaluate.size(), 2u);
  {
    std::lock_guard<std::mutex> lock(mu);
    bool failed = false;
    for (const TaskEvent& e : events) failed |= e.client == 5 && e.what == TaskEvent::What::kFailed;
    EXPECT_TRUE(failed);
  }
  // Its token no longer works; joining again gives a new one.
  {
    proto::HeartbeatRequest hb;
    hb.set_token(reply.token());
    proto::HeartbeatReply r;
    grpc::ClientContext ctx;
    EXPECT_EQ(stub->Heartbeat(&ctx, hb, &r).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  proto::JoinReply again;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Join(&ctx, req, &again).ok());
  }
  EXPECT_NE(again.token(), reply.token());
  {
    proto::LeaveRequest leave;
    leave.set_token(again.token());
    proto::LeaveReply r;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub->Leave(&ctx, leave, &r).ok());
  }
  finish(server, clients);
}

}  // namespace
}  // namespace tessera::fed
