// The federated client runtime: session, tasks, transfers, the Peer
// service, saved state.
#include "tessera/fed/client.h"

#include <ATen/ATen.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>
#include <tuple>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"
#include "tessera/core/runtime.h"
#include "tessera/fed/federation.grpc.pb.h"
#include "tessera/formats/safetensors.h"
#include "tessera/rpc/rpc.h"
#include "transfer.h"

namespace tessera::fed {

namespace {

using Clock = std::chrono::steady_clock;
using internal::Refusal;

constexpr const char* kEnvServer = "TESSERA_FED_SERVER";
constexpr const char* kEnvClient = "TESSERA_FED_CLIENT";
constexpr const char* kEnvKeyFile = "TESSERA_FED_KEY_FILE";
constexpr const char* kEnvSpecFile = "TESSERA_FED_SPEC_FILE";
constexpr const char* kEnvStateDir = "TESSERA_FED_STATE_DIR";
constexpr const char* kEnvMaxMessage = "TESSERA_FED_MAX_MESSAGE";
constexpr const char* kStateFile = "model.safetensors";

// A failed call to the coordinator, with its gRPC code (the run loop
// decides: join again, retry, or give the task up).
struct RpcFailure : std::exception {
  RpcFailure(grpc::StatusCode c, std::string m) : code(c), message(std::move(m)) {}
  const char* what() const noexcept override { return message.c_str(); }
  grpc::StatusCode code;
  std::string message;
};

void check_rpc(const grpc::Status& status, const std::string& what) {
  if (!status.ok()) throw RpcFailure(status.error_code(), what + ": " + status.error_message());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in, NotFound, "cannot read '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

}  // namespace

struct Client::Impl final : public proto::Peer::Service {
  ClientOptions opt;
  ClientApp* app = nullptr;
  std::vector<std::pair<std::string, at::Tensor>> params;
  std::map<std::string, at::Tensor> by_name;
  ModelPartition partition;
  std::unique_ptr<proto::Coordinator::Stub> coordinator;
  rpc::Server peer_server;

  mutable std::mutex session_mu;
  std::string token;     // guarded by session_mu
  std::string peer_key;  // guarded by session_mu
  int64_t chunk_bytes = 1 << 20;
  std::chrono::milliseconds heartbeat{500};

  // Published experts: (round, full parameter name -> tensor), newest last,
  // at most two. Guarded by snapshot_mu.
  mutable std::mutex snapshot_mu;
  std::vector<std::pair<int64_t, TensorMap>> snapshots;

  mutable std::mutex traffic_mu;
  ClientTraffic counters;  // guarded by traffic_mu

  std::mutex stubs_mu;
  std::map<std::string, std::unique_ptr<proto::Peer::Stub>> peer_stubs;  // guarded by stubs_mu

  std::atomic<bool> stopping{false};
  std::mutex stop_mu;
  std::condition_variable stop_cv;
  std::thread heartbeat_thread;
  bool has_model = false;
  bool restored = false;
  bool report_restored = false;

  // --- helpers -------------------------------------------------------------------
  std::string current_token() const {
    std::lock_guard<std::mutex> lock(session_mu);
    return token;
  }

  void count_server(int64_t out, int64_t in) {
    std::lock_guard<std::mutex> lock(traffic_mu);
    counters.to_server += out;
    counters.from_server += in;
  }

  TensorMap expert_tensors(const TensorMap& full, int64_t layer, int64_t expert) const {
    TensorMap out;
    for (const std::string& name : partition.expert(layer, expert)) {
      out[parse_expert_parameter(name)->suffix] = full.at(name);
    }
    return out;
  }

  void publish_snapshot(int64_t round) {
    TensorMap copy;
    for (const std::string& name : partition.expert_names())
      copy[name] = by_name.at(name).detach().clone();
    std::lock_guard<std::mutex> lock(snapshot_mu);
    snapshots.emplace_back(round, std::move(copy));
    while (snapshots.size() > 2) snapshots.erase(snapshots.begin());
  }

  // The newest published snapshot of round <= version (nullptr: none).
  const TensorMap* snapshot_upto(int64_t version, int64_t* round) const {
    for (auto it = snapshots.rbegin(); it != snapshots.rend(); ++it) {
      if (it->first <= version) {
        *round = it->first;
        return &it->second;
      }
    }
    return nullptr;
  }

  void save_state(int64_t round) {
    if (opt.state_dir.empty()) return;
    nn::NamedTensors all;
    for (const auto& [name, t] : params) all.emplace_back(name, t.detach());
    nn::save_safetensors(
        opt.state_dir + "/" + kStateFile, all,
        {{"snapshot_round", std::to_string(round)}, {"client", std::to_string(opt.client_id)}});
  }

  void restore_state() {
    const std::string path = opt.state_dir + "/" + kStateFile;
    if (opt.state_dir.empty() || !std::filesystem::exists(path)) return;
    const nn::SafetensorsFile file = nn::SafetensorsFile::open(path);
    at::NoGradGuard no_grad;
    for (auto& [name, t] : params) {
      std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
      t.copy_(file.get(name, t.scalar_type(), shape));
    }
    auto it = file.metadata().find("snapshot_round");
    TESSERA_CHECK(it != file.metadata().end(), DataLoss, path,
                  ": no 'snapshot_round' in its metadata");
    publish_snapshot(std::stoll(it->second));
    has_model = restored = report_restored = true;
    TESSERA_LOG(Info, "fed") << "client " << opt.client_id << " restored its model from " << path
                             << " (round " << it->second << ")";
  }

  // --- Peer service ------------------------------------------------------------------
  grpc::Status FetchExpert(grpc::ServerContext*, const proto::ExpertRequest* req,
                           grpc::ServerWriter<proto::Chunk>* writer) override {
    return internal::guarded([&] {
      std::string key;
      {
        std::lock_guard<std::mutex> lock(session_mu);
        key = peer_key;
      }
      if (req->owner() != opt.client_id ||
          !internal::check_grant(key, req->grant(), req->requester(), opt.client_id, req->layer(),
                                 req->expert(), req->version())) {
        throw Refusal(grpc::StatusCode::PERMISSION_DENIED,
                      detail::concat("client ", opt.client_id, ": no valid grant for client ",
                                     req->requester(), " to fetch expert ", req->expert(),
                                     " of layer ", req->layer(), " for version ", req->version()));
      }
      TESSERA_CHECK(partition.experts.count({req->layer(), req->expert()}), NotFound, "client ",
                    opt.client_id, " has no expert ", req->expert(), " in layer ", req->layer());
      TensorMap tensors;
      int64_t round = 0;
      {
        std::lock_guard<std::mutex> lock(snapshot_mu);
        const TensorMap* snap = snapshot_upto(req->version(), &round);
        TESSERA_CHECK(snap != nullptr, FailedPrecondition, "client ", opt.client_id,
                      " holds no experts from version ", req->version(), " or earlier");
        tensors = expert_tensors(*snap, req->layer(), req->expert());
      }
      proto::Chunk header;
      header.mutable_expert()->set_round(round);
      header.mutable_expert()->set_tensor_count(static_cast<int64_t>(tensors.size()));
      int64_t sent = static_cast<int64_t>(header.ByteSizeLong());
      const bool ok = writer->Write(header);
      internal::NamedTensorList list(tensors.begin(), tensors.end());
      const int64_t body =
          ok ? internal::write_tensors(list, chunk_bytes,
                                       [&](const proto::Chunk& c) { return writer->Write(c); })
             : -1;
      std::lock_guard<std::mutex> lock(traffic_mu);
      counters.to_peer[req->requester()] += sent + std::max<int64_t>(body, 0);
      TESSERA_CHECK(body >= 0, Unavailable, "expert to client ", req->requester(),
                    ": stream broke");
    });
  }

  // Reads an ExpertHeader and its tensors; returns the bytes received.
  static int64_t read_expert(grpc::ClientReaderInterface<proto::Chunk>& reader,
                             const std::string& source, TensorMap* out) {
    proto::Chunk chunk;
    int64_t bytes = 0;
    int64_t count = -1;
    internal::TensorAssembler assembler(source);
    while (reader.Read(&chunk)) {
      bytes += static_cast<int64_t>(chunk.ByteSizeLong());
      if (count < 0) {
        TESSERA_CHECK(chunk.has_expert(), InvalidArgument, source,
                      ": the stream must start with an expert header");
        count = chunk.expert().tensor_count();
        continue;
      }
      TESSERA_CHECK(chunk.has_tensor(), InvalidArgument, source, ": a second header");
      assembler.add(chunk.tensor());
    }
    check_rpc(reader.Finish(), source);
    *out = assembler.finish(count);
    return bytes;
  }

  proto::Peer::Stub& peer_stub(const std::string& address) {
    std::lock_guard<std::mutex> lock(stubs_mu);
    auto& stub = peer_stubs[address];
    if (!stub) stub = proto::Peer::NewStub(rpc::channel(address, {opt.max_message_bytes}));
    return *stub;
  }

  struct SyncStats {
    int64_t download_bytes = 0;
    std::map<int, int64_t> from_peer;
    int64_t fallbacks = 0;
    int64_t fetch_failures = 0;
  };

  // Expert (layer, expert) of `src.owner`: from the owner, else the
  // server's copy; nullopt when neither serves it.
  std::optional<TensorMap> fetch(const proto::ExpertSource& src, int64_t layer, int64_t version,
                                 SyncStats* stats) {
    proto::ExpertRequest req;
    req.set_requester(opt.client_id);
    req.set_owner(src.owner());
    req.set_layer(layer);
    req.set_expert(src.expert());
    req.set_version(version);
    const std::string what =
        detail::concat("expert ", src.expert(), " of layer ", layer, " of client ", src.owner());
    std::string last_error = "the owner has no session";
    if (!src.owner_address().empty() && !src.grant().empty()) {
      req.set_grant(src.grant());
      for (int attempt = 1; attempt <= opt.fetch_attempts; ++attempt) {
        grpc::ClientContext ctx;
        rpc::set_deadline(ctx, opt.fetch_timeout);
        auto reader = peer_stub(src.owner_address()).FetchExpert(&ctx, req);
        TensorMap out;
        try {
          const int64_t bytes = read_expert(*reader, what + " from its owner", &out);
          stats->from_peer[src.owner()] += bytes;
          std::lock_guard<std::mutex> lock(traffic_mu);
          counters.from_peer[src.owner()] += bytes;
          return out;
        } catch (const RpcFailure& f) {
          last_error = f.message;
          const bool transient = f.code == grpc::StatusCode::UNAVAILABLE ||
                                 f.code == grpc::StatusCode::DEADLINE_EXCEEDED ||
                                 f.code == grpc::StatusCode::CANCELLED;
          if (!transient) break;
        } catch (const Error& e) {
          last_error = e.what();
          break;
        }
        if (attempt < opt.fetch_attempts) std::this_thread::sleep_for(opt.retry_backoff * attempt);
      }
    }
    TESSERA_LOG(Warn, "fed") << "client " << opt.client_id << ": " << what
                             << " from its owner failed (" << last_error
                             << "); asking the server for its copy";
    req.clear_grant();
    req.set_token(current_token());
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, opt.fetch_timeout);
    auto reader = coordinator->FetchExpertCopy(&ctx, req);
    TensorMap out;
    try {
      const int64_t bytes = read_expert(*reader, what + " from the server's copy", &out);
      count_server(static_cast<int64_t>(req.ByteSizeLong()), bytes);
      stats->download_bytes += bytes;
      ++stats->fallbacks;
      std::lock_guard<std::mutex> lock(traffic_mu);
      ++counters.fallbacks;
      return out;
    } catch (const std::exception& e) {
      TESSERA_LOG(Warn, "fed") << "client " << opt.client_id << ": " << what
                               << " is unavailable from the server too (" << e.what()
                               << "); left out";
      ++stats->fetch_failures;
      return std::nullopt;
    }
  }

  // FedMoE-DA: own experts become the weighted sums of their neighbours.
  void personalise(const proto::PayloadHeader& header, SyncStats* stats) {
    if (header.mixes().empty()) return;
    std::map<std::tuple<int, int64_t, int64_t>, std::optional<TensorMap>> fetched;
    for (const proto::ExpertMix& mix : header.mixes()) {
      for (const proto::ExpertSource& src : mix.sources()) {
        if (src.owner() == opt.client_id) continue;
        const auto key = std::make_tuple(src.owner(), mix.layer(), src.expert());
        if (!fetched.count(key)) fetched[key] = fetch(src, mix.layer(), header.version(), stats);
      }
    }
    TensorMap own;
    {
      std::lock_guard<std::mutex> lock(snapshot_mu);
      TESSERA_CHECK(!snapshots.empty(), FailedPrecondition, "client ", opt.client_id,
                    " has no experts of its own to personalise");
      own = snapshots.back().second;
    }
    std::vector<std::pair<int64_t, TensorMap>> mixed;  // (own expert, suffix -> value)
    std::vector<int64_t> layers;
    for (const proto::ExpertMix& mix : header.mixes()) {
      std::vector<TensorMap> holders;
      holders.reserve(static_cast<size_t>(mix.sources_size()));
      std::vector<double> weights;
      double total = 0;
      for (const proto::ExpertSource& src : mix.sources()) {
        if (src.owner() == opt.client_id) {
          holders.push_back(expert_tensors(own, mix.layer(), src.expert()));
        } else {
          const auto& got = fetched.at(std::make_tuple(src.owner(), mix.layer(), src.expert()));
          if (!got) continue;
          holders.push_back(*got);
        }
        weights.push_back(src.weight());
        total += src.weight();
      }
      TESSERA_CHECK(!holders.empty() && total > 0, Unavailable, "client ", opt.client_id,
                    ": no source of expert ", mix.expert(), " of layer ", mix.layer(),
                    " could be fetched");
      std::vector<std::pair<double, const TensorMap*>> sources;
      for (size_t k = 0; k < holders.size(); ++k)
        sources.emplace_back(weights[k] / total, &holders[k]);
      mixed.emplace_back(mix.expert(), mix_experts(sources));
      layers.push_back(mix.layer());
    }
    at::NoGradGuard no_grad;
    for (size_t k = 0; k < mixed.size(); ++k) {
      for (const std::string& name : partition.expert(layers[k], mixed[k].first)) {
        const std::string suffix = parse_expert_parameter(name)->suffix;
        by_name.at(name).copy_(mixed[k].second.at(suffix));
      }
    }
  }

  // Downloads the task's payload, loads it and personalises experts.
  proto::PayloadHeader sync(const proto::Task& task, SyncStats* stats) {
    proto::DownloadRequest req;
    req.set_token(current_token());
    req.set_task_id(task.task_id());
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, opt.transfer_timeout);
    auto reader = coordinator->Download(&ctx, req);
    proto::Chunk chunk;
    proto::PayloadHeader header;
    bool have_header = false;
    int64_t bytes = 0;
    internal::TensorAssembler assembler(
        detail::concat("payload of round ", task.round(), " for client ", opt.client_id));
    while (reader->Read(&chunk)) {
      bytes += static_cast<int64_t>(chunk.ByteSizeLong());
      if (!have_header) {
        TESSERA_CHECK(chunk.has_payload(), InvalidArgument,
                      "download: the stream must start with a payload header");
        header = chunk.payload();
        have_header = true;
        continue;
      }
      TESSERA_CHECK(chunk.has_tensor(), InvalidArgument, "download: a second header");
      assembler.add(chunk.tensor());
    }
    check_rpc(reader->Finish(), "download for round " + std::to_string(task.round()));
    count_server(static_cast<int64_t>(req.ByteSizeLong()), bytes);
    stats->download_bytes += bytes;
    const TensorMap tensors = assembler.finish(header.tensor_count());
    {
      at::NoGradGuard no_grad;
      for (const auto& [name, t] : tensors) {
        auto it = by_name.find(name);
        TESSERA_CHECK(it != by_name.end(), InvalidArgument, "the server sent '", name,
                      "', which this client's model does not have");
        TESSERA_CHECK(it->second.sizes() == t.sizes(), InvalidArgument, "the server sent '", name,
                      "' as ", t.sizes(), ", this client's model has ", it->second.sizes());
        it->second.copy_(t);
      }
    }
    if (header.bootstrap()) {
      TESSERA_CHECK(static_cast<int64_t>(tensors.size()) == static_cast<int64_t>(params.size()),
                    InvalidArgument, "bootstrap payload has ", tensors.size(),
                    " parameters, the model ", params.size());
      {
        std::lock_guard<std::mutex> lock(snapshot_mu);
        snapshots.clear();
      }
      publish_snapshot(0);
      has_model = true;
    }
    TESSERA_CHECK(has_model, FailedPrecondition, "client ", opt.client_id,
                  " holds no model and the server sent no bootstrap");
    personalise(header, stats);
    return header;
  }

  void submit(const proto::Task& task, const proto::ResultHeader& result,
              const std::vector<std::string>& upload) {
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, opt.transfer_timeout);
    proto::SubmitReply reply;
    auto writer = coordinator->Submit(&ctx, &reply);
    proto::Chunk chunk;
    *chunk.mutable_result() = result;
    chunk.mutable_result()->set_token(current_token());
    chunk.mutable_result()->set_task_id(task.task_id());
    chunk.mutable_result()->set_tensor_count(static_cast<int64_t>(upload.size()));
    int64_t bytes = static_cast<int64_t>(chunk.ByteSizeLong());
    bool ok = writer->Write(chunk);
    if (ok) {
      internal::NamedTensorList list;
      for (const std::string& name : upload) {
        auto it = by_name.find(name);
        TESSERA_CHECK(it != by_name.end(), InvalidArgument, "the server asked for '", name,
                      "', which this client's model does not have");
        list.emplace_back(name, it->second.detach());
      }
      const int64_t body = internal::write_tensors(
          list, chunk_bytes, [&](const proto::Chunk& c) { return writer->Write(c); });
      ok = body >= 0;
      bytes += std::max<int64_t>(body, 0);
    }
    if (ok) writer->WritesDone();
    const grpc::Status status = writer->Finish();
    count_server(bytes, static_cast<int64_t>(reply.ByteSizeLong()));
    check_rpc(status, "submit for round " + std::to_string(task.round()));
  }

  void add_sync_metrics(const SyncStats& s, google::protobuf::Map<std::string, double>* m) {
    int64_t p2p = 0;
    for (const auto& [owner, b] : s.from_peer) {
      (*m)["p2p_from." + std::to_string(owner)] = static_cast<double>(b);
      p2p += b;
    }
    (*m)["p2p_bytes"] = static_cast<double>(p2p);
    (*m)["download_bytes"] = static_cast<double>(s.download_bytes);
    (*m)["fallbacks"] = static_cast<double>(s.fallbacks);
    (*m)["fetch_failures"] = static_cast<double>(s.fetch_failures);
    if (report_restored) {
      (*m)["restored"] = 1;
      report_restored = false;
    }
  }

  void run_task(const proto::Task& task) {
    SyncStats stats;
    proto::ResultHeader result;
    std::vector<std::string> upload;
    try {
      const proto::PayloadHeader header = sync(task, &stats);
      TaskInfo info{task.round(), task.kind() == proto::FIT,
                    Config(header.config().begin(), header.config().end())};
      if (info.fit) {
        const FitOutcome out = app->fit(info);
        publish_snapshot(task.round());
        save_state(task.round());
        result.set_num_examples(out.num_examples);
        for (const auto& [k, v] : out.metrics) (*result.mutable_metrics())[k] = v;
        upload.assign(header.upload().begin(), header.upload().end());
      } else {
        const EvaluateOutcome out = app->evaluate(info);
        result.set_num_examples(out.num_examples);
        result.set_loss(out.loss);
        for (const auto& [k, v] : out.metrics) (*result.mutable_metrics())[k] = v;
      }
      add_sync_metrics(stats, result.mutable_metrics());
    } catch (const RpcFailure&) {
      throw;
    } catch (const std::exception& e) {
      TESSERA_LOG(Error, "fed") << "client " << opt.client_id << ": round " << task.round()
                                << " task failed: " << e.what();
      result.Clear();
      result.set_error(e.what());
      upload.clear();
    }
    submit(task, result, upload);
  }

  void join() {
    proto::JoinRequest req;
    req.set_client_id(opt.client_id);
    req.set_enrollment_key(opt.enrollment_key);
    req.set_peer_address(peer_server.address());
    req.set_has_state(has_model);
    proto::JoinReply reply;
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(10));
    const grpc::Status status = coordinator->Join(&ctx, req, &reply);
    if (status.error_code() == grpc::StatusCode::PERMISSION_DENIED ||
        status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
      TESSERA_THROW(FailedPrecondition, "client ", opt.client_id, ": join refused by ",
                    opt.server_address, ": ", status.error_message());
    }
    check_rpc(status, "join");
    count_server(static_cast<int64_t>(req.ByteSizeLong()),
                 static_cast<int64_t>(reply.ByteSizeLong()));
    std::lock_guard<std::mutex> lock(session_mu);
    token = reply.token();
    peer_key = reply.peer_key();
    chunk_bytes = reply.chunk_bytes();
    heartbeat = std::chrono::milliseconds(std::max<int64_t>(50, reply.heartbeat_ms()));
  }

  void heartbeat_loop() {
    while (!stopping) {
      std::chrono::milliseconds interval;
      {
        std::lock_guard<std::mutex> lock(session_mu);
        interval = heartbeat;
      }
      {
        std::unique_lock<std::mutex> lock(stop_mu);
        stop_cv.wait_for(lock, interval, [&] { return stopping.load(); });
      }
      if (stopping) return;
      const std::string t = current_token();
      if (t.empty()) continue;
      proto::HeartbeatRequest req;
      req.set_token(t);
      proto::HeartbeatReply reply;
      grpc::ClientContext ctx;
      rpc::set_deadline(ctx, interval * 2);
      if (coordinator->Heartbeat(&ctx, req, &reply).ok()) {
        count_server(static_cast<int64_t>(req.ByteSizeLong()),
                     static_cast<int64_t>(reply.ByteSizeLong()));
      }
    }
  }

  void run() {
    // Join, retrying while the server is not up yet.
    auto unreachable_since = Clock::now();
    while (true) {
      try {
        join();
        break;
      } catch (const RpcFailure& f) {
        if (Clock::now() - unreachable_since > opt.server_timeout) {
          TESSERA_THROW(Unavailable, "client ", opt.client_id, ": server ", opt.server_address,
                        " unreachable for ", opt.server_timeout.count() / 1000.0, " s (", f.message,
                        ")");
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      }
    }
    heartbeat_thread = std::thread([this] { heartbeat_loop(); });
    unreachable_since = Clock::now();
    bool reachable = true;
    while (!stopping) {
      proto::PollRequest req;
      req.set_token(current_token());
      proto::Task task;
      grpc::ClientContext ctx;
      rpc::set_deadline(ctx, std::chrono::seconds(30));
      const grpc::Status status = coordinator->Poll(&ctx, req, &task);
      if (status.ok()) {
        reachable = true;
        count_server(static_cast<int64_t>(req.ByteSizeLong()),
                     static_cast<int64_t>(task.ByteSizeLong()));
      } else if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
        TESSERA_LOG(Warn, "fed") << "client " << opt.client_id << ": " << status.error_message();
        try {
          join();
        } catch (const RpcFailure& f) {
          TESSERA_LOG(Warn, "fed")
              << "client " << opt.client_id << ": join again failed: " << f.message;
        }
        continue;
      } else {
        if (reachable) unreachable_since = Clock::now();
        reachable = false;
        TESSERA_CHECK(Clock::now() - unreachable_since <= opt.server_timeout, Unavailable,
                      "client ", opt.client_id, ": server ", opt.server_address,
                      " unreachable for ", opt.server_timeout.count() / 1000.0, " s (",
                      status.error_message(), ")");
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      if (task.kind() == proto::SHUTDOWN) {
        // The server ended the session itself: nothing to leave.
        std::lock_guard<std::mutex> lock(session_mu);
        token.clear();
        break;
      }
      if (task.kind() == proto::IDLE) continue;
      try {
        run_task(task);
      } catch (const RpcFailure& f) {
        // A dropped session (UNAUTHENTICATED) is noticed by the next poll;
        // a dropped task (FAILED_PRECONDITION) or a broken transfer leaves
        // this round to the others.
        TESSERA_LOG(Warn, "fed") << "client " << opt.client_id << ": round " << task.round() << ": "
                                 << f.message;
      }
    }
  }

  void stop_threads() {
    stopping = true;
    stop_cv.notify_all();
    if (heartbeat_thread.joinable()) heartbeat_thread.join();
  }
};

Client::Client(ClientOptions options, ClientApp& app) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.opt = std::move(options);
  d.app = &app;
  TESSERA_CHECK(!d.opt.server_address.empty(), InvalidArgument, "fed client: no server address");
  TESSERA_CHECK(!d.opt.enrollment_key.empty(), InvalidArgument, "fed client ", d.opt.client_id,
                ": no enrollment key");
  TESSERA_CHECK(d.opt.fetch_attempts >= 1, InvalidArgument, "fed client: fetch_attempts is ",
                d.opt.fetch_attempts, ", expected >= 1");
  d.params = app.parameters();
  std::vector<std::string> names;
  for (const auto& [name, t] : d.params) {
    TESSERA_CHECK(d.by_name.emplace(name, t).second, InvalidArgument, "fed client: parameter '",
                  name, "' listed twice");
    names.push_back(name);
  }
  d.partition = partition_parameters(names);
  if (!d.opt.state_dir.empty()) std::filesystem::create_directories(d.opt.state_dir);
  d.restore_state();
  d.coordinator =
      proto::Coordinator::NewStub(rpc::channel(d.opt.server_address, {d.opt.max_message_bytes}));
  d.peer_server = rpc::Server::start({&d}, {d.opt.peer_host, 0, d.opt.max_message_bytes});
}

Client::~Client() {
  impl_->stop_threads();
  impl_->peer_server.shutdown(std::chrono::milliseconds(500));
}

void Client::run() {
  Impl& d = *impl_;
  try {
    d.run();
  } catch (...) {
    d.stop_threads();
    throw;
  }
  // Say goodbye if the session is still ours (after a stop()).
  const std::string t = d.current_token();
  if (!t.empty()) {
    proto::LeaveRequest req;
    req.set_token(t);
    proto::LeaveReply reply;
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, std::chrono::seconds(2));
    d.coordinator->Leave(&ctx, req, &reply);
  }
  d.stop_threads();
}

void Client::stop() {
  impl_->stopping = true;
  impl_->stop_cv.notify_all();
}

std::string Client::peer_address() const { return impl_->peer_server.address(); }

ClientTraffic Client::traffic() const {
  std::lock_guard<std::mutex> lock(impl_->traffic_mu);
  return impl_->counters;
}

bool Client::restored() const { return impl_->restored; }

// --- Launcher ------------------------------------------------------------------------
ClientLauncher::ClientLauncher(LauncherOptions options) : options_(std::move(options)) {
  TESSERA_CHECK(!options_.work_dir.empty(), InvalidArgument, "fed launcher: no work_dir");
  TESSERA_CHECK(!options_.specs.empty(), InvalidArgument,
                "fed launcher: no clients (specs is empty)");
  TESSERA_CHECK(options_.threads_per_client >= 1, InvalidArgument,
                "fed launcher: threads_per_client is ", options_.threads_per_client);
  if (options_.program.empty()) {
    char self[PATH_MAX];
    const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    TESSERA_CHECK(n > 0, Internal, "fed launcher: cannot resolve /proc/self/exe");
    options_.program = std::string(self, static_cast<size_t>(n));
  }
  std::filesystem::create_directories(options_.work_dir);
  // The key is passed in a file only its owner may read, not on the
  // command line or in the environment.
  const std::string key_file = options_.work_dir + "/enrollment.key";
  {
    std::ofstream out(key_file, std::ios::binary | std::ios::trunc);
    TESSERA_CHECK(out, NotFound, "fed launcher: cannot write '", key_file, "'");
    out << options_.enrollment_key;
  }
  chmod(key_file.c_str(), S_IRUSR | S_IWUSR);
  for (size_t i = 0; i < options_.specs.size(); ++i) {
    const std::string spec = options_.work_dir + "/client-" + std::to_string(i) + ".spec.json";
    std::ofstream out(spec, std::ios::binary | std::ios::trunc);
    TESSERA_CHECK(out, NotFound, "fed launcher: cannot write '", spec, "'");
    out << options_.specs[i];
  }
  processes_.resize(options_.specs.size());
  starts_.assign(options_.specs.size(), 0);
  for (int i = 0; i < size(); ++i) spawn(i);
}

ClientLauncher::~ClientLauncher() {
  for (Subprocess& p : processes_) {
    if (p.valid() && p.running()) p.stop(std::chrono::milliseconds(500));
  }
}

int ClientLauncher::size() const { return static_cast<int>(options_.specs.size()); }

std::string ClientLauncher::log_path(int client) const {
  return options_.work_dir + "/client-" + std::to_string(client) + "." +
         std::to_string(starts_.at(client)) + ".log";
}

void ClientLauncher::spawn(int client) {
  ++starts_.at(client);
  SpawnOptions so;
  so.argv = {options_.program};
  so.argv.insert(so.argv.end(), options_.program_args.begin(), options_.program_args.end());
  so.env = options_.env;
  so.env[kEnvServer] = options_.server_address;
  so.env[kEnvClient] = std::to_string(client);
  so.env[kEnvKeyFile] = options_.work_dir + "/enrollment.key";
  so.env[kEnvSpecFile] = options_.work_dir + "/client-" + std::to_string(client) + ".spec.json";
  so.env[kEnvStateDir] = options_.work_dir + "/client-" + std::to_string(client) + ".state";
  so.env[kEnvMaxMessage] = std::to_string(options_.max_message_bytes);
  so.env["TESSERA_NUM_THREADS"] = std::to_string(options_.threads_per_client);
  so.stdout_mode = SpawnOptions::Stream::kFile;
  so.stdout_file = log_path(client);
  so.stderr_mode = SpawnOptions::Stream::kStdout;
  processes_.at(client) = Subprocess::spawn(so);
}

bool ClientLauncher::running(int client) {
  Subprocess& p = processes_.at(client);
  return p.valid() && p.running();
}

pid_t ClientLauncher::pid(int client) const { return processes_.at(client).pid(); }

void ClientLauncher::kill(int client) {
  Subprocess& p = processes_.at(client);
  if (!p.valid()) return;
  p.signal(SIGKILL);
  p.wait();
}

void ClientLauncher::restart(int client) {
  TESSERA_CHECK(!running(client), FailedPrecondition, "fed launcher: client ", client,
                " is still running");
  spawn(client);
}

std::vector<ExitStatus> ClientLauncher::wait(std::chrono::milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  std::vector<ExitStatus> out;
  for (Subprocess& p : processes_) {
    const auto left =
        std::max(std::chrono::milliseconds(0),
                 std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()));
    std::optional<ExitStatus> s = p.wait_for(left);
    out.push_back(s ? *s : p.stop(std::chrono::milliseconds(500)));
  }
  return out;
}

std::optional<int> run_client_if_spawned(const AppFactory& factory) {
  const std::string server = env_or_empty(kEnvServer);
  if (server.empty()) return std::nullopt;
  const std::string id_text = env_or_empty(kEnvClient);
  try {
    init_runtime();
    ClientOptions o;
    o.server_address = server;
    o.client_id = std::stoi(id_text);
    o.enrollment_key = read_file(env_or_empty(kEnvKeyFile));
    o.state_dir = env_or_empty(kEnvStateDir);
    const std::string max_message = env_or_empty(kEnvMaxMessage);
    if (!max_message.empty()) o.max_message_bytes = std::stoi(max_message);
    TESSERA_CHECK(factory != nullptr, InvalidArgument, "run_client_if_spawned: no app factory");
    std::unique_ptr<ClientApp> app = factory(read_file(env_or_empty(kEnvSpecFile)), o.client_id);
    Client client(o, *app);
    client.run();
    return 0;
  } catch (const std::exception& e) {
    TESSERA_LOG(Error, "fed") << "client " << id_text << ": " << e.what();
    return 1;
  }
}

}  // namespace tessera::fed
