// The federated server: the Coordinator service, sessions, phases and
// byte counters.
#include "tessera/fed/server.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <set>
#include <thread>
#include <tuple>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/tensor.h"
#include "tessera/fed/federation.grpc.pb.h"
#include "tessera/rpc/rpc.h"
#include "transfer.h"

namespace tessera::fed {

int64_t RoundRecord::server_bytes_in() const {
  int64_t n = 0;
  for (const auto& [c, l] : links) n += l.client_to_server;
  return n;
}

int64_t RoundRecord::server_bytes_out() const {
  int64_t n = 0;
  for (const auto& [c, l] : links) n += l.server_to_client;
  return n;
}

int64_t RoundRecord::peer_bytes() const {
  int64_t n = 0;
  for (const auto& [k, b] : peer_links) n += b;
  return n;
}

namespace {

using Clock = std::chrono::steady_clock;
using internal::Refusal;

constexpr const char* kSessionGone =
    "no session for this token (dropped, replaced by a newer join, or never issued); join again";

Config to_config(const google::protobuf::Map<std::string, double>& m) {
  return Config(m.begin(), m.end());
}

}  // namespace

struct Server::Impl final : public proto::Coordinator::Service {
  struct Session {
    int client = 0;
    std::string token;     // hex of 32 random bytes
    std::string peer_key;  // 32 random bytes
    std::string peer_address;
    Clock::time_point last_seen;
    bool bootstrap = true;      // the client holds no model yet
    int64_t held_version = -1;  // payload version it last received in full
  };

  enum class Status { kQueued, kRunning, kDone, kFailed };
  struct TaskState {
    int64_t id = 0;
    int client = 0;
    int64_t round = 0;
    bool fit = true;
    std::string token;  // the session it belongs to
    Payload payload;
    std::vector<std::string> upload;
    Config config;
    Status status = Status::kQueued;
    FitResult fit_result;
    EvaluateResult evaluate_result;
    std::string failure;
    // (owner, layer, expert) this task may fetch from the server's copy.
    std::set<std::tuple<int, int64_t, int64_t>> grants;
    int64_t version = -1;  // of the payload as downloaded
  };

  ServerOptions opt;
  std::unique_ptr<Strategy> strategy;
  std::mutex strategy_mu;  // guards calls into `strategy`
  std::map<std::string, std::pair<std::vector<int64_t>, at::ScalarType>> shapes;
  rpc::Server grpc_server;

  mutable std::mutex mu;
  std::condition_variable cv;
  std::map<int, Session> sessions;                      // guarded by mu
  std::map<int64_t, std::shared_ptr<TaskState>> tasks;  // this phase's, guarded by mu
  std::map<int, LinkBytes> traffic;                     // guarded by mu
  int64_t fallbacks = 0;                                // guarded by mu
  int64_t next_task = 0;
  int64_t round = 0;
  bool shutting_down = false;
  bool stopped = false;
  std::mt19937_64 rng;

  // --- helpers (mu held unless stated) ---------------------------------------
  // The session holding `token`, compared in constant time with each.
  Session* session_for(const std::string& token) {
    for (auto& [c, s] : sessions) {
      if (internal::secrets_equal(s.token, token)) return &s;
    }
    return nullptr;
  }

  Session& require_session(const std::string& token) {
    Session* s = session_for(token);
    if (!s) throw Refusal(grpc::StatusCode::UNAUTHENTICATED, kSessionGone);
    s->last_seen = Clock::now();
    return *s;
  }

  std::shared_ptr<TaskState> require_task(const Session& s, int64_t task_id) {
    auto it = tasks.find(task_id);
    TESSERA_CHECK(
        it != tasks.end() && it->second->client == s.client && it->second->token == s.token,
        FailedPrecondition, "task ", task_id, " is not a task of client ", s.client,
        " in this phase");
    TESSERA_CHECK(it->second->status == Status::kRunning, FailedPrecondition, "task ", task_id,
                  " of client ", s.client, " is no longer running",
                  it->second->failure.empty() ? std::string() : " (" + it->second->failure + ")");
    return it->second;
  }

  // Ends a session; its unfinished tasks fail with `reason`. Returns the
  // events to report once mu is released.
  std::vector<TaskEvent> end_session(int client, const std::string& reason) {
    std::vector<TaskEvent> events;
    auto it = sessions.find(client);
    if (it == sessions.end()) return events;
    for (auto& [id, t] : tasks) {
      if (t->client == client && t->token == it->second.token &&
          (t->status == Status::kQueued || t->status == Status::kRunning)) {
        t->status = Status::kFailed;
        t->failure = reason;
        events.push_back({TaskEvent::What::kFailed, client, t->round, t->fit, reason});
      }
    }
    sessions.erase(it);
    cv.notify_all();
    return events;
  }

  void report(const std::vector<TaskEvent>& events) {
    if (!opt.on_event) return;
    for (const TaskEvent& e : events) opt.on_event(e);
  }

  void count_in(int client, int64_t bytes) { traffic[client].client_to_server += bytes; }
  void count_out(int client, int64_t bytes) { traffic[client].server_to_client += bytes; }

  // --- Coordinator service -----------------------------------------------------
  grpc::Status Join(grpc::ServerContext*, const proto::JoinRequest* req,
                    proto::JoinReply* reply) override {
    std::vector<TaskEvent> events;
    grpc::Status status = internal::guarded([&] {
      if (!internal::secrets_equal(req->enrollment_key(), opt.enrollment_key)) {
        throw Refusal(grpc::StatusCode::PERMISSION_DENIED, "join refused: wrong enrollment key");
      }
      TESSERA_CHECK(req->client_id() >= 0, InvalidArgument, "join: client id ", req->client_id(),
                    " is negative");
      TESSERA_CHECK(!req->peer_address().empty(), InvalidArgument, "join: client ",
                    req->client_id(), " gave no peer address");
      std::lock_guard<std::mutex> lock(mu);
      TESSERA_CHECK(!shutting_down, Unavailable, "join: the federation is shutting down");
      events = end_session(req->client_id(), "the client joined again");
      Session s;
      s.client = req->client_id();
      s.token = internal::hex(internal::random_bytes(32));
      s.peer_key = internal::random_bytes(32);
      s.peer_address = req->peer_address();
      s.last_seen = Clock::now();
      s.bootstrap = !req->has_state();
      reply->set_token(s.token);
      reply->set_peer_key(s.peer_key);
      reply->set_heartbeat_ms(opt.heartbeat_interval.count());
      reply->set_chunk_bytes(opt.chunk_bytes);
      sessions[s.client] = s;
      count_in(s.client, static_cast<int64_t>(req->ByteSizeLong()));
      count_out(s.client, static_cast<int64_t>(reply->ByteSizeLong()));
      TESSERA_LOG(Info, "fed") << "client " << s.client << " joined (peer " << s.peer_address
                               << (req->has_state() ? ", restored its model" : "") << ")";
      cv.notify_all();
    });
    report(events);
    return status;
  }

  grpc::Status Poll(grpc::ServerContext* ctx, const proto::PollRequest* req,
                    proto::Task* task) override {
    return internal::guarded([&] {
      std::unique_lock<std::mutex> lock(mu);
      int client = require_session(req->token()).client;
      count_in(client, static_cast<int64_t>(req->ByteSizeLong()));
      const auto until = Clock::now() + opt.poll_wait;
      while (true) {
        Session* s = session_for(req->token());
        if (!s) throw Refusal(grpc::StatusCode::UNAUTHENTICATED, kSessionGone);
        s->last_seen = Clock::now();
        if (shutting_down) {
          task->set_kind(proto::SHUTDOWN);
          count_out(client, static_cast<int64_t>(task->ByteSizeLong()));
          sessions.erase(client);
          cv.notify_all();
          return;
        }
        for (auto& [id, t] : tasks) {
          if (t->client == client && t->token == s->token && t->status == Status::kQueued) {
            t->status = Status::kRunning;
            task->set_kind(t->fit ? proto::FIT : proto::EVALUATE);
            task->set_task_id(t->id);
            task->set_round(t->round);
            count_out(client, static_cast<int64_t>(task->ByteSizeLong()));
            return;
          }
        }
        if (Clock::now() >= until || ctx->IsCancelled()) break;
        cv.wait_until(lock, until);
      }
      task->set_kind(proto::IDLE);
      count_out(client, static_cast<int64_t>(task->ByteSizeLong()));
    });
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const proto::HeartbeatRequest* req,
                         proto::HeartbeatReply* reply) override {
    return internal::guarded([&] {
      std::lock_guard<std::mutex> lock(mu);
      Session& s = require_session(req->token());
      count_in(s.client, static_cast<int64_t>(req->ByteSizeLong()));
    });
  }

  grpc::Status Leave(grpc::ServerContext*, const proto::LeaveRequest* req,
                     proto::LeaveReply*) override {
    std::vector<TaskEvent> events;
    grpc::Status status = internal::guarded([&] {
      std::lock_guard<std::mutex> lock(mu);
      Session& s = require_session(req->token());
      count_in(s.client, static_cast<int64_t>(req->ByteSizeLong()));
      events = end_session(s.client, "the client left");
    });
    report(events);
    return status;
  }

  grpc::Status Download(grpc::ServerContext*, const proto::DownloadRequest* req,
                        grpc::ServerWriter<proto::Chunk>* writer) override {
    std::vector<TaskEvent> events;
    grpc::Status status = internal::guarded([&] {
      proto::Chunk header_chunk;
      proto::PayloadHeader* header = header_chunk.mutable_payload();
      internal::NamedTensorList tensors;
      int client = 0;
      std::shared_ptr<TaskState> task;
      bool bootstrap = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        Session& s = require_session(req->token());
        client = s.client;
        count_in(client, static_cast<int64_t>(req->ByteSizeLong()));
        task = require_task(s, req->task_id());
        bootstrap = s.bootstrap;
        const bool current = !bootstrap && s.held_version == task->payload.version;
        header->set_version(task->payload.version);
        header->set_bootstrap(bootstrap);
        for (const std::string& u : task->upload) header->add_upload(u);
        for (const auto& [k, v] : task->config) (*header->mutable_config())[k] = v;
        if (!current) {
          for (const ExpertMix& mix : task->payload.mixes) {
            proto::ExpertMix* m = header->add_mixes();
            m->set_layer(mix.layer);
            m->set_expert(mix.expert);
            for (const ExpertSource& src : mix.sources) {
              proto::ExpertSource* p = m->add_sources();
              p->set_owner(src.owner);
              p->set_expert(src.expert);
              p->set_weight(src.weight);
              if (src.owner == client) continue;
              task->grants.insert({src.owner, mix.layer, src.expert});
              auto owner = sessions.find(src.owner);
              if (owner == sessions.end()) continue;  // gone: the client asks for the server's copy
              p->set_owner_address(owner->second.peer_address);
              p->set_grant(internal::make_grant(owner->second.peer_key, client, src.owner,
                                                mix.layer, src.expert, task->payload.version));
            }
          }
        }
        TensorMap all;
        if (bootstrap) {
          std::lock_guard<std::mutex> strategy_lock(strategy_mu);
          all = strategy->bootstrap(client);
        }
        if (!current) {
          for (const auto& [k, v] : task->payload.tensors) all[k] = v;
        }
        for (auto& [k, v] : all) tensors.emplace_back(k, v);
        header->set_tensor_count(static_cast<int64_t>(tensors.size()));
      }
      // Stream outside the lock; count as we go.
      int64_t sent = static_cast<int64_t>(header_chunk.ByteSizeLong());
      TESSERA_CHECK(writer->Write(header_chunk), Unavailable, "download to client ", client,
                    ": stream broke");
      const int64_t body = internal::write_tensors(
          tensors, opt.chunk_bytes, [&](const proto::Chunk& c) { return writer->Write(c); });
      std::lock_guard<std::mutex> lock(mu);
      count_out(client, sent + std::max<int64_t>(body, 0));
      TESSERA_CHECK(body >= 0, Unavailable, "download to client ", client, ": stream broke");
      auto s = sessions.find(client);
      if (s != sessions.end() && s->second.token == task->token) {
        s->second.bootstrap = false;
        s->second.held_version = task->payload.version;
      }
      task->version = task->payload.version;
      events.push_back({TaskEvent::What::kStarted, client, task->round, task->fit, ""});
    });
    report(events);
    return status;
  }

  grpc::Status Submit(grpc::ServerContext*, grpc::ServerReader<proto::Chunk>* reader,
                      proto::SubmitReply* reply) override {
    std::vector<TaskEvent> events;
    int client = -1;
    int64_t received = 0;
    grpc::Status status = internal::guarded([&] {
      proto::Chunk chunk;
      TESSERA_CHECK(reader->Read(&chunk) && chunk.has_result(), InvalidArgument,
                    "submit: the stream must start with a result header");
      received += static_cast<int64_t>(chunk.ByteSizeLong());
      const proto::ResultHeader header = chunk.result();
      std::shared_ptr<TaskState> task;
      {
        std::lock_guard<std::mutex> lock(mu);
        Session& s = require_session(header.token());
        client = s.client;
        task = require_task(s, header.task_id());
      }
      internal::TensorAssembler assembler("result of client " + std::to_string(client) +
                                          ", round " + std::to_string(task->round));
      while (reader->Read(&chunk)) {
        received += static_cast<int64_t>(chunk.ByteSizeLong());
        TESSERA_CHECK(chunk.has_tensor(), InvalidArgument, "submit: a second header in client ",
                      client, "'s result");
        assembler.add(chunk.tensor());
      }
      TensorMap tensors = assembler.finish(header.tensor_count());
      std::string failure = header.error();
      if (failure.empty() && task->fit) {
        std::set<std::string> expected(task->upload.begin(), task->upload.end());
        for (const auto& [name, t] : tensors) {
          TESSERA_CHECK(expected.count(name), InvalidArgument, "client ", client, " uploaded '",
                        name, "', which the task did not ask for");
          const auto& [shape, dtype] = shapes.at(name);
          TESSERA_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dtype,
                        InvalidArgument, "client ", client, " uploaded '", name, "' as ",
                        dtype_name(t.scalar_type()), " ", shape_string(t.sizes()),
                        ", the model has ", dtype_name(dtype), " ", shape_string(shape));
          TESSERA_CHECK(at::isfinite(t).all().item<bool>(), InvalidArgument, "client ", client,
                        " uploaded '", name, "' with non-finite values");
        }
        TESSERA_CHECK(tensors.size() == expected.size(), InvalidArgument, "client ", client,
                      " uploaded ", tensors.size(), " of the ", expected.size(),
                      " parameters the task asked for");
      }
      std::lock_guard<std::mutex> lock(mu);
      TESSERA_CHECK(task->status == Status::kRunning, FailedPrecondition, "client ", client,
                    "'s result for round ", task->round, " arrived after it was dropped (",
                    task->failure, ")");
      if (!failure.empty()) {
        task->status = Status::kFailed;
        task->failure = "the client reported: " + failure;
        events.push_back({TaskEvent::What::kFailed, client, task->round, task->fit, task->failure});
      } else if (task->fit) {
        task->fit_result = {client, std::move(tensors), header.num_examples(),
                            to_config(header.metrics())};
        task->status = Status::kDone;
        events.push_back({TaskEvent::What::kFinished, client, task->round, true, ""});
      } else {
        task->evaluate_result = {client, header.num_examples(), header.loss(),
                                 to_config(header.metrics())};
        task->status = Status::kDone;
        events.push_back({TaskEvent::What::kFinished, client, task->round, false, ""});
      }
      cv.notify_all();
    });
    {
      std::lock_guard<std::mutex> lock(mu);
      if (client >= 0) {
        count_in(client, received);
        count_out(client, static_cast<int64_t>(reply->ByteSizeLong()));
      }
    }
    report(events);
    return status;
  }

  grpc::Status FetchExpertCopy(grpc::ServerContext*, const proto::ExpertRequest* req,
                               grpc::ServerWriter<proto::Chunk>* writer) override {
    return internal::guarded([&] {
      int client = 0;
      {
        std::lock_guard<std::mutex> lock(mu);
        Session& s = require_session(req->token());
        client = s.client;
        count_in(client, static_cast<int64_t>(req->ByteSizeLong()));
        bool granted = false;
        for (const auto& [id, t] : tasks) {
          if (t->client == client && t->token == s.token && t->status == Status::kRunning &&
              t->version == req->version() &&
              t->grants.count({req->owner(), req->layer(), req->expert()})) {
            granted = true;
          }
        }
        if (!granted || req->requester() != client) {
          throw Refusal(
              grpc::StatusCode::PERMISSION_DENIED,
              detail::concat("client ", client, " may not fetch expert ", req->expert(),
                             " of layer ", req->layer(), " of client ", req->owner(),
                             " for version ", req->version(), " (no grant in its running task)"));
        }
      }
      std::optional<Strategy::ExpertCopy> copy;
      {
        std::lock_guard<std::mutex> strategy_lock(strategy_mu);
        copy = strategy->expert_copy(req->owner(), req->layer(), req->expert());
      }
      TESSERA_CHECK(copy.has_value(), NotFound, "the server keeps no copy of expert ",
                    req->expert(), " of layer ", req->layer(), " of client ", req->owner());
      proto::Chunk header;
      header.mutable_expert()->set_round(copy->round);
      header.mutable_expert()->set_tensor_count(static_cast<int64_t>(copy->tensors.size()));
      header.mutable_expert()->set_server_copy(true);
      internal::NamedTensorList tensors(copy->tensors.begin(), copy->tensors.end());
      int64_t sent = static_cast<int64_t>(header.ByteSizeLong());
      const bool ok = writer->Write(header);
      const int64_t body =
          ok ? internal::write_tensors(tensors, opt.chunk_bytes,
                                       [&](const proto::Chunk& c) { return writer->Write(c); })
             : -1;
      std::lock_guard<std::mutex> lock(mu);
      count_out(client, sent + std::max<int64_t>(body, 0));
      ++fallbacks;
      TESSERA_CHECK(body >= 0, Unavailable, "expert copy to client ", client, ": stream broke");
    });
  }

  // --- Phases ------------------------------------------------------------------
  // Runs one phase's tasks to completion or failure.
  void run_phase(int64_t r, bool fit, std::vector<std::shared_ptr<TaskState>> list,
                 std::vector<std::shared_ptr<TaskState>>* out) {
    std::vector<TaskEvent> events;
    {
      std::lock_guard<std::mutex> lock(mu);
      tasks.clear();
      for (auto& t : list) {
        t->id = ++next_task;
        auto s = sessions.find(t->client);
        if (s == sessions.end()) {
          t->status = Status::kFailed;
          t->failure = "no session";
          events.push_back({TaskEvent::What::kFailed, t->client, r, fit, t->failure});
        } else {
          t->token = s->second.token;
        }
        tasks[t->id] = t;
      }
      cv.notify_all();
    }
    report(events);
    const auto deadline = Clock::now() + opt.phase_timeout;
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      events.clear();
      bool pending = false;
      const auto now = Clock::now();
      for (auto& t : list) {
        if (t->status != Status::kQueued && t->status != Status::kRunning) continue;
        auto s = sessions.find(t->client);
        std::string reason;
        if (s == sessions.end() || s->second.token != t->token) {
          reason = "its session ended";
        } else if (now - s->second.last_seen > opt.client_timeout) {
          reason = detail::concat("no heartbeat for ",
                                  std::chrono::duration<double>(now - s->second.last_seen).count(),
                                  " s");
        } else if (now > deadline) {
          reason = detail::concat("missed the ", opt.phase_timeout.count() / 1000.0,
                                  " s phase deadline");
        }
        if (reason.empty()) {
          pending = true;
          continue;
        }
        TESSERA_LOG(Warn, "fed") << "round " << r << (fit ? " fit" : " evaluate") << ": client "
                                 << t->client << " dropped: " << reason;
        if (s != sessions.end() && s->second.token == t->token) {
          for (const TaskEvent& e : end_session(t->client, reason)) events.push_back(e);
        } else {
          t->status = Status::kFailed;
          t->failure = reason;
          events.push_back({TaskEvent::What::kFailed, t->client, r, fit, reason});
        }
      }
      if (!events.empty()) {
        lock.unlock();
        report(events);
        lock.lock();
        continue;
      }
      if (!pending) break;
      cv.wait_for(lock, std::chrono::milliseconds(100));
    }
    *out = list;
  }

  std::vector<int> live_locked() const {
    std::vector<int> ids;
    for (const auto& [c, s] : sessions) ids.push_back(c);
    return ids;
  }
};

Server::Server(ServerOptions options, std::unique_ptr<Strategy> strategy, const TensorMap& initial)
    : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.opt = std::move(options);
  TESSERA_CHECK(d.opt.enrollment_key.size() >= 16, InvalidArgument,
                "fed server: the enrollment key has ", d.opt.enrollment_key.size(),
                " bytes, expected at least 16");
  TESSERA_CHECK(d.opt.chunk_bytes >= 1 && d.opt.chunk_bytes + 4096 <= d.opt.max_message_bytes,
                InvalidArgument, "fed server: chunk_bytes ", d.opt.chunk_bytes,
                " must be >= 1 and leave 4096 bytes of the ", d.opt.max_message_bytes,
                "-byte message limit for the other fields");
  TESSERA_CHECK(strategy != nullptr, InvalidArgument, "fed server: no strategy");
  TESSERA_CHECK(!initial.empty(), InvalidArgument, "fed server: empty initial model");
  for (const auto& [name, t] : initial) {
    d.shapes[name] = {std::vector<int64_t>(t.sizes().begin(), t.sizes().end()), t.scalar_type()};
  }
  d.strategy = std::move(strategy);
  d.strategy->initialize(initial);
  d.rng.seed(d.opt.seed);
  d.grpc_server = rpc::Server::start({&d}, {d.opt.host, d.opt.port, d.opt.max_message_bytes});
  TESSERA_LOG(Info, "fed") << "server (" << d.strategy->name() << ") listening on "
                           << d.grpc_server.address();
}

Server::~Server() {
  try {
    shutdown(std::chrono::seconds(2));
  } catch (const std::exception& e) {
    TESSERA_LOG(Warn, "fed") << "server shutdown: " << e.what();
  }
}

std::string Server::address() const { return impl_->grpc_server.address(); }

void Server::wait_for_clients(int count, std::chrono::milliseconds timeout) {
  Impl& d = *impl_;
  std::unique_lock<std::mutex> lock(d.mu);
  if (d.cv.wait_for(lock, timeout, [&] { return static_cast<int>(d.sessions.size()) >= count; }))
    return;
  std::string have;
  for (int c : d.live_locked()) have += (have.empty() ? "" : ", ") + std::to_string(c);
  TESSERA_THROW(DeadlineExceeded, "fed server: ", d.sessions.size(), " of ", count,
                " clients joined within ", timeout.count() / 1000.0,
                " s (joined: ", have.empty() ? "none" : have, ")");
}

RoundRecord Server::run_round() {
  Impl& d = *impl_;
  TESSERA_CHECK(!d.shutting_down, FailedPrecondition, "fed server: run_round after shutdown");
  const auto start = Clock::now();
  RoundRecord rec;
  std::map<int, LinkBytes> before;
  int64_t fallbacks_before = 0;
  std::vector<int> available;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    rec.round = ++d.round;
    before = d.traffic;
    fallbacks_before = d.fallbacks;
    available = d.live_locked();
  }
  // Fit.
  std::vector<std::shared_ptr<Impl::TaskState>> list, done;
  {
    std::lock_guard<std::mutex> lock(d.strategy_mu);
    for (FitInstruction& in : d.strategy->configure_fit(rec.round, available, d.rng)) {
      auto t = std::make_shared<Impl::TaskState>();
      t->client = in.client;
      t->round = rec.round;
      t->fit = true;
      t->payload = std::move(in.payload);
      t->upload = std::move(in.upload);
      t->config = std::move(in.config);
      list.push_back(t);
    }
  }
  d.run_phase(rec.round, true, list, &done);
  std::vector<FitResult> fit_results;
  for (auto& t : done) {
    if (t->status == Impl::Status::kDone) {
      rec.fit.push_back({t->client, t->fit_result.num_examples, 0.0, t->fit_result.metrics});
      fit_results.push_back(std::move(t->fit_result));
    } else {
      rec.fit_failures.push_back({t->client, t->failure});
    }
  }
  {
    std::lock_guard<std::mutex> lock(d.strategy_mu);
    d.strategy->aggregate_fit(rec.round, fit_results, rec.fit_failures);
  }
  fit_results.clear();
  // Evaluate.
  {
    std::lock_guard<std::mutex> lock(d.mu);
    available = d.live_locked();
  }
  list.clear();
  {
    std::lock_guard<std::mutex> lock(d.strategy_mu);
    for (EvaluateInstruction& in : d.strategy->configure_evaluate(rec.round, available, d.rng)) {
      auto t = std::make_shared<Impl::TaskState>();
      t->client = in.client;
      t->round = rec.round;
      t->fit = false;
      t->payload = std::move(in.payload);
      t->config = std::move(in.config);
      list.push_back(t);
    }
  }
  d.run_phase(rec.round, false, list, &done);
  std::vector<EvaluateResult> eval_results;
  for (auto& t : done) {
    if (t->status == Impl::Status::kDone) {
      const EvaluateResult& e = t->evaluate_result;
      rec.evaluate.push_back({t->client, e.num_examples, e.loss, e.metrics});
      eval_results.push_back(e);
    } else {
      rec.evaluate_failures.push_back({t->client, t->failure});
    }
  }
  {
    std::lock_guard<std::mutex> lock(d.strategy_mu);
    rec.summary = d.strategy->aggregate_evaluate(rec.round, eval_results, rec.evaluate_failures);
  }
  {
    std::lock_guard<std::mutex> lock(d.mu);
    d.tasks.clear();
    for (const auto& [c, now] : d.traffic) {
      const LinkBytes& was = before.count(c) ? before.at(c) : LinkBytes{};
      LinkBytes delta{now.client_to_server - was.client_to_server,
                      now.server_to_client - was.server_to_client};
      if (delta.client_to_server || delta.server_to_client) rec.links[c] = delta;
    }
    rec.fallbacks = d.fallbacks - fallbacks_before;
  }
  // Client -> client bytes as the receivers reported them ("p2p_from.<owner>").
  for (const auto* reports : {&rec.fit, &rec.evaluate}) {
    for (const ClientReport& r : *reports) {
      for (const auto& [key, value] : r.metrics) {
        if (key.rfind("p2p_from.", 0) == 0) {
          rec.peer_links[{std::stoi(key.substr(9)), r.client}] +=
              static_cast<int64_t>(std::llround(value));
        }
      }
    }
  }
  rec.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return rec;
}

void Server::shutdown(std::chrono::milliseconds grace) {
  Impl& d = *impl_;
  {
    std::unique_lock<std::mutex> lock(d.mu);
    if (d.stopped) return;
    d.shutting_down = true;
    d.cv.notify_all();
    d.cv.wait_for(lock, grace, [&] { return d.sessions.empty(); });
    if (!d.sessions.empty()) {
      TESSERA_LOG(Warn, "fed")
          << "server shutdown: " << d.sessions.size()
          << " clients did not poll for their SHUTDOWN within the grace period";
    }
    d.stopped = true;
  }
  d.grpc_server.shutdown(std::chrono::milliseconds(500));
}

std::vector<int> Server::live_clients() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->live_locked();
}

std::map<int, LinkBytes> Server::traffic() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->traffic;
}

const Strategy& Server::strategy() const { return *impl_->strategy; }

}  // namespace tessera::fed
