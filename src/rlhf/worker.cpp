// The worker side of the rlhf runtime: roles, the Worker gRPC service, the
// per-process executor that runs calls in the driver's order, and the data
// plane's reading end.
#include "tessera/rlhf/worker.h"

#include <ATen/ATen.h>
#include <signal.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <thread>

#include "runtime_internal.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/dist/rendezvous.h"
#include "tessera/formats/safetensors.h"
#include "tessera/rlhf/worker.grpc.pb.h"
#include "tessera/rpc/rpc.h"

namespace tessera::rlhf {

Args& Args::set(const std::string& key, int64_t value) {
  fields_.emplace_back(key, std::to_string(value));
  return *this;
}
Args& Args::set(const std::string& key, double value) {
  fields_.emplace_back(key, nlohmann::json(value).dump());
  return *this;
}
Args& Args::set(const std::string& key, bool value) {
  fields_.emplace_back(key, value ? "true" : "false");
  return *this;
}
Args& Args::set(const std::string& key, const std::string& value) {
  fields_.emplace_back(key, nlohmann::json(value).dump());
  return *this;
}
std::string Args::json() const {
  std::string out = "{";
  for (size_t i = 0; i < fields_.size(); ++i) {
    if (i) out += ",";
    out += nlohmann::json(fields_[i].first).dump() + ":" + fields_[i].second;
  }
  return out + "}";
}

void MethodTable::add(const std::string& name, Protocol protocol, MethodMesh mesh, Method method) {
  TESSERA_CHECK(!entries_.count(name), InvalidArgument, "method '", name, "' registered twice");
  TESSERA_CHECK(mesh.dp_size >= 1 && mesh.tp_size >= 1 && mesh.dp_rank >= 0 &&
                    mesh.dp_rank < mesh.dp_size && mesh.tp_rank >= 0 && mesh.tp_rank < mesh.tp_size,
                InvalidArgument, "method '", name, "': rank (dp ", mesh.dp_rank, ", tp ",
                mesh.tp_rank, ") outside its mesh ", mesh.dp_size, "x", mesh.tp_size);
  entries_.emplace(name, Entry{protocol, mesh, std::move(method)});
}

void RoleRegistry::add(const std::string& type, Factory factory) {
  factories_[type] = std::move(factory);
}

std::unique_ptr<Role> RoleRegistry::create(const std::string& type) const {
  auto it = factories_.find(type);
  if (it == factories_.end()) {
    std::string known;
    for (const auto& [k, v] : factories_) known += (known.empty() ? "" : ", ") + k;
    throw NotFound(detail::concat("unknown role type '", type, "' (known: ", known, ")"));
  }
  return it->second();
}

namespace {

// Padding (InputRef.repeat_last): the driver pads a data-parallel chunk
// with fewer rows than the chunk holds. A request may ask for at most this
// many rows, and at most this many bytes of them (checked once the rows'
// size is known), before anything is allocated.
constexpr int64_t kMaxPaddingRows = int64_t{1} << 20;
constexpr double kMaxPaddingBytes = double(int64_t{1} << 30);

struct HostedRole {
  std::string name;
  std::unique_ptr<Role> role;
  MethodTable methods;
  std::unique_ptr<WorkerContext> context;
};

// Rows [offset, offset + rows) of every tensor of a batch (views).
Batch slice_rows(const Batch& batch, int64_t offset, int64_t rows, const std::string& what) {
  const int64_t have = batch.empty() ? 0 : batch_rows(batch);
  // rows <= have - offset rather than offset + rows <= have: both come from
  // a request and their sum may overflow.
  TESSERA_CHECK(offset >= 0 && rows >= 0 && offset <= have && rows <= have - offset,
                InvalidArgument, what, ": ", rows, " rows from row ", offset, " requested, ", have,
                " held");
  Batch out;
  for (const auto& [k, t] : batch) out[k] = t.narrow(0, offset, rows);
  return out;
}

class WorkerService final : public proto::Worker::Service {
 public:
  WorkerService(int process, int pool_rank, std::string scratch, std::vector<HostedRole>* roles,
                std::string fault)
      : process_(process), pool_rank_(pool_rank), scratch_(std::move(scratch)), roles_(roles) {
    parse_fault(fault);
    executor_ = std::thread([this] { executor_loop(); });
  }
  ~WorkerService() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    executor_.join();
  }

  grpc::Status Call(grpc::ServerContext* context, const proto::CallRequest* request,
                    proto::CallReply* reply) override {
    auto job = std::make_shared<Job>();
    // Structural checks first: a request that fails them never takes a
    // place in the call order.
    grpc::Status pre = rpc::guard([&] { prepare(*request, *job); });
    if (!pre.ok()) return pre;
    {
      std::lock_guard<std::mutex> lock(mu_);
      TESSERA_CHECK(!queue_.count(request->seq()), InvalidArgument, "call seq ", request->seq(),
                    " submitted twice");
      job->request = request;
      job->reply = reply;
      queue_[request->seq()] = job;
    }
    cv_.notify_all();
    std::unique_lock<std::mutex> lock(mu_);
    while (!job->done) {
      if (context->IsCancelled())
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the caller");
      cv_.wait_for(lock, std::chrono::milliseconds(50));
    }
    return job->status;
  }

  grpc::Status Fetch(grpc::ServerContext*, const proto::FetchRequest* request,
                     proto::FetchReply* reply) override {
    return rpc::guard([&] {
      std::lock_guard<std::mutex> lock(store_mu_);
      auto it = store_.find(request->batch());
      TESSERA_CHECK(it != store_.end(), NotFound, "process ", process_, " holds no batch '",
                    request->batch(), "'");
      Batch rows =
          slice_rows(it->second, request->offset(), request->rows(), "Fetch " + request->batch());
      for (const auto& [k, t] : rows) rpc::to_proto(t, k, reply->add_tensors());
    });
  }

  grpc::Status Release(grpc::ServerContext*, const proto::ReleaseRequest* request,
                       proto::ReleaseReply* reply) override {
    return rpc::guard([&] {
      std::lock_guard<std::mutex> lock(store_mu_);
      int64_t n = 0;
      for (auto it = store_.begin(); it != store_.end();) {
        if (it->first.rfind(request->prefix(), 0) == 0) {
          std::error_code ec;
          std::filesystem::remove(internal::shared_batch_path(scratch_, it->first, process_), ec);
          it = store_.erase(it);
          ++n;
        } else {
          ++it;
        }
      }
      shared_cache_.clear();
      reply->set_released(n);
    });
  }

  grpc::Status Health(grpc::ServerContext*, const proto::HealthRequest*,
                      proto::HealthReply* reply) override {
    std::lock_guard<std::mutex> lock(mu_);
    reply->set_pid(getpid());
    reply->set_calls_done(calls_done_);
    reply->set_running(running_);
    return grpc::Status::OK;
  }

  grpc::Status Shutdown(grpc::ServerContext*, const proto::ShutdownRequest*,
                        proto::ShutdownReply*) override {
    std::lock_guard<std::mutex> lock(mu_);
    shutdown_requested_ = true;
    shutdown_cv_.notify_all();
    return grpc::Status::OK;
  }

  void wait_for_shutdown() {
    std::unique_lock<std::mutex> lock(mu_);
    shutdown_cv_.wait(lock, [&] { return shutdown_requested_; });
  }

 private:
  struct Job {
    const proto::CallRequest* request = nullptr;
    proto::CallReply* reply = nullptr;
    HostedRole* role = nullptr;
    const MethodTable::Entry* entry = nullptr;
    std::unique_ptr<ConfigObject> args;
    std::vector<Batch> inline_parts;  // decoded inline rows, one per inline part in order
    grpc::Status status;
    bool done = false;
  };

  void prepare(const proto::CallRequest& request, Job& job) {
    TESSERA_CHECK(request.seq() > 0, InvalidArgument, "call seq must be positive");
    for (HostedRole& r : *roles_) {
      if (r.name == request.role()) job.role = &r;
    }
    TESSERA_CHECK(job.role, InvalidArgument, "process ", process_, " hosts no role '",
                  request.role(), "'");
    auto it = job.role->methods.entries().find(request.method());
    TESSERA_CHECK(it != job.role->methods.entries().end(), InvalidArgument, "role '",
                  request.role(), "' has no method '", request.method(), "'");
    job.entry = &it->second;
    job.args = std::make_unique<ConfigObject>(
        ConfigObject::parse(request.args_json().empty() ? "{}" : request.args_json(),
                            request.role() + "." + request.method() + " args"));
    for (const proto::InputRef& in : request.inputs()) {
      TESSERA_CHECK(!in.batch().empty() && in.repeat_last() >= 0, InvalidArgument,
                    "input without a batch name or with negative padding");
      TESSERA_CHECK(in.repeat_last() <= kMaxPaddingRows, InvalidArgument, "input '", in.batch(),
                    "': padding of ", in.repeat_last(), " rows; at most ", kMaxPaddingRows);
      for (const proto::BatchPart& part : in.parts()) {
        TESSERA_CHECK(part.offset() >= 0 && part.rows() >= 0, InvalidArgument, "input '",
                      in.batch(), "': negative row range");
        if (part.process() != -1) continue;
        Batch rows;
        for (const rpc::TensorProto& t : part.inline_rows()) {
          TESSERA_CHECK(!rows.count(t.name()), InvalidArgument, "input '", in.batch(),
                        "': tensor '", t.name(), "' twice");
          rows[t.name()] = rpc::from_proto(t);
        }
        TESSERA_CHECK(!rows.empty() && batch_rows(rows) == part.rows(), InvalidArgument, "input '",
                      in.batch(), "': inline part holds ", rows.empty() ? 0 : batch_rows(rows),
                      " rows, ", part.rows(), " declared");
        job.inline_parts.push_back(std::move(rows));
      }
    }
  }

  // The rows of `batch` that `process` published (memory-mapped, cached).
  Batch shared_batch(const std::string& batch, int process) {
    const std::string path = internal::shared_batch_path(scratch_, batch, process);
    auto it = shared_cache_.find(path);
    if (it != shared_cache_.end()) return it->second;
    TESSERA_CHECK(std::filesystem::exists(path), NotFound, "batch '", batch, "' of process ",
                  process, " is not published (", path, ")");
    auto file = nn::SafetensorsFile::open(path);
    Batch rows;
    for (const auto& info : file.tensors()) rows[info.name] = file.get(info.name);
    shared_cache_[path] = rows;
    return rows;
  }

  Batch read_inputs(Job& job) {
    Batch merged;
    size_t inline_index = 0;
    for (const proto::InputRef& in : job.request->inputs()) {
      std::vector<Batch> pieces;
      for (const proto::BatchPart& part : in.parts()) {
        if (part.process() == -1) {
          pieces.push_back(job.inline_parts.at(inline_index++));
        } else if (part.process() == process_) {
          std::lock_guard<std::mutex> lock(store_mu_);
          auto it = store_.find(in.batch());
          TESSERA_CHECK(it != store_.end(), NotFound, "process ", process_, " holds no batch '",
                        in.batch(), "'");
          pieces.push_back(
              slice_rows(it->second, part.offset(), part.rows(), "input " + in.batch()));
        } else {
          pieces.push_back(slice_rows(shared_batch(in.batch(), part.process()), part.offset(),
                                      part.rows(), "input " + in.batch()));
        }
      }
      if (pieces.empty()) continue;
      for (const auto& [key, first] : pieces.front()) {
        TESSERA_CHECK(!merged.count(key), InvalidArgument, "inputs: tensor '", key,
                      "' appears in two input batches");
        at::Tensor t;
        if (pieces.size() == 1) {
          t = first;
        } else {
          std::vector<at::Tensor> parts;
          for (const Batch& p : pieces) {
            auto f = p.find(key);
            TESSERA_CHECK(f != p.end() && p.size() == pieces.front().size(), InvalidArgument,
                          "input '", in.batch(), "': parts hold different tensors");
            parts.push_back(f->second);
          }
          t = at::cat(parts, 0);
        }
        if (in.repeat_last() > 0) {
          TESSERA_CHECK(t.size(0) > 0, InvalidArgument, "input '", in.batch(),
                        "': padding an empty batch");
          // The driver pads a data-parallel chunk with fewer rows than the
          // chunk holds; a request asking for more than kMaxPaddingBytes of
          // copies is refused before allocating them.
          const double row_bytes =
              static_cast<double>(t.numel() / t.size(0)) * static_cast<double>(t.element_size());
          TESSERA_CHECK(row_bytes * static_cast<double>(in.repeat_last()) <= kMaxPaddingBytes,
                        ResourceExhausted, "input '", in.batch(), "': padding with ",
                        in.repeat_last(), " copies of its last row (", row_bytes,
                        " bytes each) is more than ", kMaxPaddingBytes, " bytes");
          std::vector<int64_t> reps(t.dim(), 1);
          reps[0] = in.repeat_last();
          t = at::cat({t, t.narrow(0, t.size(0) - 1, 1).repeat(reps)}, 0);
        }
        merged[key] = t;
      }
    }
    return merged;
  }

  void run(Job& job) {
    const proto::CallRequest& req = *job.request;
    const std::string name = req.role() + "." + req.method();
    const int count = ++call_counts_[name];
    if (name == fault_method_ && count == fault_call_ && pool_rank_ == fault_rank_) {
      TESSERA_LOG(Warn, "rlhf") << "fault injection: killing this worker at " << name << " call "
                                << count;
      ::kill(getpid(), SIGKILL);
    }
    Stopwatch watch;
    Batch inputs = read_inputs(job);
    MethodResult result =
        translate_errors(name, [&] { return job.entry->method(inputs, *job.args); });
    job.args->check_no_unknown_keys();
    if (!result.output.empty()) {
      TESSERA_CHECK(!req.output().empty(), InvalidArgument, name,
                    " returned rows but the call names no output");
      const int64_t rows = batch_rows(result.output);
      for (auto& [k, t] : result.output) t = t.detach().contiguous();
      if (req.publish()) {
        nn::NamedTensors named(result.output.begin(), result.output.end());
        nn::save_safetensors(internal::shared_batch_path(scratch_, req.output(), process_), named);
      }
      job.reply->set_output_rows(rows);
      std::lock_guard<std::mutex> lock(store_mu_);
      store_[req.output()] = std::move(result.output);
    }
    for (const auto& [k, v] : result.metrics) (*job.reply->mutable_metrics())[k] = v;
    job.reply->set_seconds(watch.seconds());
  }

  void executor_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stopping_ || queue_.count(next_seq_); });
      if (stopping_) return;
      auto job = queue_[next_seq_];
      queue_.erase(next_seq_);
      running_ = job->request->role() + "." + job->request->method();
      lock.unlock();
      job->status = rpc::guard([&] { run(*job); });
      lock.lock();
      running_.clear();
      ++next_seq_;
      ++calls_done_;
      job->done = true;
      cv_.notify_all();
    }
  }

  void parse_fault(const std::string& spec) {
    if (spec.empty()) return;
    const size_t a = spec.find(':'), b = spec.rfind(':');
    TESSERA_CHECK(a != std::string::npos && b > a, InvalidArgument, internal::kEnvFault,
                  ": expected role.method:N:rank, got '", spec, "'");
    fault_method_ = spec.substr(0, a);
    fault_call_ = std::stoi(spec.substr(a + 1, b - a - 1));
    fault_rank_ = std::stoi(spec.substr(b + 1));
  }

  const int process_, pool_rank_;
  const std::string scratch_;
  std::vector<HostedRole>* roles_;

  std::mutex mu_;
  std::condition_variable cv_, shutdown_cv_;
  std::map<uint64_t, std::shared_ptr<Job>> queue_;
  uint64_t next_seq_ = 1, calls_done_ = 0;
  std::string running_;
  bool stopping_ = false, shutdown_requested_ = false;
  std::thread executor_;

  std::mutex store_mu_;
  std::map<std::string, Batch> store_;
  std::map<std::string, Batch> shared_cache_;  // executor thread only (and Release)
  std::map<std::string, int> call_counts_;
  std::string fault_method_;
  int fault_call_ = 0, fault_rank_ = -1;
};

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

}  // namespace

std::optional<int> run_worker_if_spawned(const RoleRegistry& registry) {
  const std::string driver_address = env_or_empty(internal::kEnvDriver);
  if (driver_address.empty()) return std::nullopt;
  const int process = std::stoi(env_or_empty(internal::kEnvProcess));
  const std::string run_id = env_or_empty(internal::kEnvRun);
  const std::string scratch = env_or_empty(internal::kEnvScratch);
  const std::string max_message = env_or_empty(internal::kEnvMaxMessage);
  const int max_bytes = max_message.empty() ? (4 << 20) : std::stoi(max_message);

  proto::RegisterRequest reg;
  reg.set_run_id(run_id);
  reg.set_process(process);
  reg.set_pid(getpid());
  std::vector<HostedRole> roles;
  std::shared_ptr<dist::ProcessGroup> world;
  std::unique_ptr<WorkerService> service;
  rpc::Server server;
  try {
    world = dist::init_process_group();
    auto specs = nlohmann::json::parse(env_or_empty(internal::kEnvRoles));
    for (const auto& spec : specs) {
      HostedRole hosted;
      hosted.name = spec.at("name").get<std::string>();
      hosted.context = std::make_unique<WorkerContext>(WorkerContext{
          hosted.name,
          ConfigObject::parse(spec.at("config").get<std::string>(), hosted.name + " config"), world,
          world ? world->rank() : 0, world ? world->size() : 1, process});
      hosted.role = registry.create(spec.at("type").get<std::string>());
      hosted.role->setup(*hosted.context, hosted.methods);
      hosted.context->config.check_no_unknown_keys();
      roles.push_back(std::move(hosted));
    }
    const int pool_rank = world ? world->rank() : 0;
    service = std::make_unique<WorkerService>(process, pool_rank, scratch, &roles,
                                              env_or_empty(internal::kEnvFault));
    server = rpc::Server::start({service.get()}, {"127.0.0.1", 0, max_bytes});
    reg.set_address(server.address());
    for (const HostedRole& r : roles) {
      for (const auto& [name, entry] : r.methods.entries()) {
        proto::MethodInfo* m = reg.add_methods();
        m->set_role(r.name);
        m->set_method(name);
        m->set_protocol(protocol_name(entry.protocol));
        m->set_dp_size(entry.mesh.dp_size);
        m->set_tp_size(entry.mesh.tp_size);
        m->set_dp_rank(entry.mesh.dp_rank);
        m->set_tp_rank(entry.mesh.tp_rank);
      }
    }
  } catch (const std::exception& e) {
    reg.set_error(e.what());
  }

  auto stub = proto::Driver::NewStub(rpc::channel(driver_address, {max_bytes}));
  grpc::ClientContext ctx;
  rpc::set_deadline(ctx, std::chrono::seconds(60));
  ctx.set_wait_for_ready(true);
  proto::RegisterReply reply;
  grpc::Status st = stub->Register(&ctx, reg, &reply);
  if (!st.ok()) {
    TESSERA_LOG(Error, "rlhf") << "process " << process << ": registering with the driver at "
                               << driver_address << " failed: " << st.error_message();
    return 1;
  }
  if (!reg.error().empty()) {
    TESSERA_LOG(Error, "rlhf") << "process " << process << ": setup failed: " << reg.error();
    return 1;
  }
  service->wait_for_shutdown();
  server.shutdown(std::chrono::seconds(2));
  service.reset();
  roles.clear();
  return 0;
}

}  // namespace tessera::rlhf
