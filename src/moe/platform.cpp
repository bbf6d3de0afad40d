#include "tessera/moe/platform.h"
#include "tessera/moe/storage.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <list>
#include <mutex>
#include <random>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"
#include "tessera/core/subprocess.h"
#include "tessera/formats/safetensors.h"
#include "tessera/moe/function.grpc.pb.h"
#include "tessera/rpc/rpc.h"

namespace tessera::moe {

namespace {
using Clock = std::chrono::steady_clock;

std::string default_program() {
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n > 0) {
    auto candidate =
        std::filesystem::path(std::string(self, static_cast<size_t>(n))).parent_path() /
        "tessera-function";
    if (std::filesystem::exists(candidate)) return candidate.string();
  }
  return "tessera-function";
}
}  // namespace

struct FunctionPlatform::Impl {
  PlatformOptions opt;
  std::string own_dir;  // the files directory this platform created ("" : none)
  std::shared_ptr<StorageChannel> channel;
  std::unique_ptr<BillingMeter> meter;

  struct Instance {
    Subprocess process;  // the tessera-function process (dies with this one)
    pid_t pid = -1;      // process.pid() while it runs, -1 once stopped
    int port = 0;
    std::unique_ptr<proto::ExpertFunction::Stub> stub;
    bool busy = false, ready = false;
    Clock::time_point last_used = Clock::now();
    int version = 0;
  };
  struct Function {
    FunctionSpec spec;
    int version = 0;
    std::list<std::shared_ptr<Instance>> instances;
  };
  mutable std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, Function> functions;
  Stats stats;
  std::atomic<uint64_t> next_request{1};
  bool stopping = false;
  std::thread reaper;
  static void stop(Instance& in) {
    if (in.process.valid()) in.process.stop(std::chrono::milliseconds(0));
    in.pid = -1;
  }

  // Starts an instance listening on a port of its choosing, which it
  // reports through a pipe it inherits; sets *port (0 when the instance
  // exited before listening).
  Subprocess spawn(const FunctionSpec& spec, int* port) {
    int fds[2];
    TESSERA_CHECK(pipe2(fds, O_CLOEXEC) == 0, Unavailable,
                  "function platform: pipe failed: ", std::strerror(errno));
    // Only the write end crosses exec (the child inherits it by number).
    fcntl(fds[1], F_SETFD, 0);
    SpawnOptions so;
    so.argv = {opt.program,
               "--port-fd",
               std::to_string(fds[1]),
               "--memory-mb",
               std::to_string(spec.memory_mb),
               "--weights",
               spec.weights,
               "--prefix",
               spec.prefix,
               "--payload-limit",
               std::to_string(opt.prices.payload_limit_bytes),
               "--mb-per-vcpu",
               std::to_string(opt.prices.memory_mb_per_vcpu),
               "--storage",
               channel->url()};
    so.new_process_group = false;
    Subprocess process;
    try {
      process = Subprocess::spawn(so);
    } catch (...) {
      close(fds[0]);
      close(fds[1]);
      throw;
    }
    close(fds[1]);
    std::string line;
    const auto until = Clock::now() + opt.start_timeout;
    while (line.find('\n') == std::string::npos && Clock::now() < until) {
      pollfd pfd{fds[0], POLLIN, 0};
      if (::poll(&pfd, 1, 100) <= 0) continue;
      char buf[32];
      const ssize_t n = read(fds[0], buf, sizeof(buf));
      if (n <= 0) break;  // the instance exited before listening
      line.append(buf, static_cast<size_t>(n));
    }
    close(fds[0]);
    *port = line.find('\n') == std::string::npos ? 0 : std::stoi(line);
    return process;
  }

  // A warm idle instance, or a new one (cold start), within the limit.
  std::shared_ptr<Instance> acquire(const std::string& name, bool* cold) {
    std::unique_lock<std::mutex> lock(mu);
    auto it = functions.find(name);
    TESSERA_CHECK(it != functions.end(), NotFound, "no function '", name, "' is deployed");
    while (true) {
      Function& f = functions.at(name);
      for (auto& in : f.instances) {
        if (!in->busy && in->ready && in->version == f.version) {
          in->busy = true;
          ++stats.warm_starts;
          *cold = false;
          return in;
        }
      }
      if (static_cast<int>(f.instances.size()) < opt.concurrency_limit) break;
      cv.wait(lock);
    }
    Function& f = functions.at(name);
    auto in = std::make_shared<Instance>();
    in->busy = true;
    in->version = f.version;
    f.instances.push_back(in);
    ++stats.cold_starts;
    const FunctionSpec spec = f.spec;
    lock.unlock();
    *cold = true;
    try {
      in->process = spawn(spec, &in->port);
      in->pid = in->process.pid();
      if (in->port == 0) {
        in->process.stop(std::chrono::milliseconds(0));
        in->pid = -1;
        throw Unavailable(detail::concat(
            "function '", name, "': the instance did not start (its error, if any, is above)"));
      }
      const std::string address = "127.0.0.1:" + std::to_string(in->port);
      in->stub = proto::ExpertFunction::NewStub(
          rpc::channel(address, {static_cast<int>(opt.prices.payload_limit_bytes)}));
      // Wait for the instance to serve, watching that it is still alive.
      const auto until = Clock::now() + opt.start_timeout;
      while (true) {
        grpc::ClientContext ctx;
        rpc::set_deadline(ctx, std::chrono::milliseconds(100));
        ctx.set_wait_for_ready(true);
        proto::FunctionHealthRequest req;
        proto::FunctionHealthReply reply;
        grpc::Status st = in->stub->Health(&ctx, req, &reply);
        if (st.ok() && reply.pid() == in->pid) break;
        if (std::optional<ExitStatus> status = in->process.poll()) {
          in->pid = -1;
          throw Unavailable(detail::concat("function '", name,
                                           "': the instance exited during its cold start (it ",
                                           status->describe(), "; its error, if any, is above)"));
        }
        TESSERA_CHECK(Clock::now() < until, Unavailable, "function '", name, "': no answer within ",
                      opt.start_timeout.count() / 1000.0, " s of its cold start");
      }
      in->ready = true;
      return in;
    } catch (...) {
      remove(name, in);
      throw;
    }
  }

  void release(const std::shared_ptr<Instance>& in) {
    std::lock_guard<std::mutex> lock(mu);
    in->busy = false;
    in->last_used = Clock::now();
    cv.notify_all();
  }

  void remove(const std::string& name, const std::shared_ptr<Instance>& in) {
    stop(*in);
    std::lock_guard<std::mutex> lock(mu);
    auto it = functions.find(name);
    if (it != functions.end()) it->second.instances.remove(in);
    cv.notify_all();
  }

  int reclaim_idle() {
    std::vector<std::shared_ptr<Instance>> victims;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto now = Clock::now();
      for (auto& [name, f] : functions) {
        for (auto it = f.instances.begin(); it != f.instances.end();) {
          auto& in = *it;
          const bool stale = in->version != f.version;
          const double idle = std::chrono::duration<double>(now - in->last_used).count();
          if (!in->busy && in->ready &&
              (stale || idle > std::chrono::duration<double>(opt.keep_alive).count())) {
            victims.push_back(in);
            it = f.instances.erase(it);
          } else {
            ++it;
          }
        }
      }
      stats.reclaimed += static_cast<int64_t>(victims.size());
      cv.notify_all();
    }
    for (auto& v : victims) stop(*v);
    return static_cast<int>(victims.size());
  }
};

FunctionPlatform::FunctionPlatform(PlatformOptions options) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.opt = std::move(options);
  if (d.opt.program.empty()) d.opt.program = default_program();
  if (d.opt.storage.empty()) {
    std::random_device rd;
    const std::string base = std::filesystem::exists("/dev/shm")
                                 ? "/dev/shm"
                                 : std::filesystem::temp_directory_path().string();
    d.own_dir = detail::concat(base, "/tessera-functions-", getpid(), "-", std::hex, rd());
    d.opt.storage = "files:" + d.own_dir;
  }
  d.channel = StorageChannel::open(d.opt.storage);
  d.meter = std::make_unique<BillingMeter>(d.opt.prices);
  d.reaper = std::thread([&d] {
    std::unique_lock<std::mutex> lock(d.mu);
    while (!d.stopping) {
      d.cv.wait_for(lock, std::chrono::milliseconds(250));
      if (d.stopping) break;
      lock.unlock();
      d.reclaim_idle();
      lock.lock();
    }
  });
}

FunctionPlatform::~FunctionPlatform() {
  Impl& d = *impl_;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    d.stopping = true;
    d.cv.notify_all();
  }
  d.reaper.join();
  for (auto& [name, f] : d.functions) {
    for (auto& in : f.instances) Impl::stop(*in);
  }
  if (!d.own_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(d.own_dir, ec);
  }
}

void FunctionPlatform::deploy(const std::string& name, const FunctionSpec& spec) {
  TESSERA_CHECK(spec.memory_mb > 0 && !spec.weights.empty(), InvalidArgument, "deploy ", name,
                ": memory size and weights are required");
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto& f = impl_->functions[name];
  const bool same = f.spec.weights == spec.weights && f.spec.prefix == spec.prefix &&
                    f.spec.memory_mb == spec.memory_mb;
  if (!same) {
    f.spec = spec;
    ++f.version;  // older instances are reclaimed once idle
  }
}

FunctionPlatform::Result FunctionPlatform::invoke(const std::string& name, const Request& request) {
  Impl& d = *impl_;
  proto::InvokeRequest req;
  req.set_request_id(d.next_request++);
  if (request.tokens.defined()) rpc::to_proto(request.tokens, "x", req.mutable_tokens());
  for (const auto& k : request.input_keys) req.add_input_keys(k);
  req.set_wait_seconds(std::chrono::duration<double>(request.wait).count());
  Result result;
  std::string last_error;
  for (int attempt = 0; attempt <= d.opt.retries; ++attempt) {
    bool cold = false;
    std::shared_ptr<Impl::Instance> in;
    try {
      in = d.acquire(name, &cold);
    } catch (const Unavailable& e) {  // the new instance died starting
      last_error = e.message();
      std::lock_guard<std::mutex> lock(d.mu);
      if (attempt < d.opt.retries) ++d.stats.retries;
      continue;
    }
    int64_t memory_mb;
    {
      std::lock_guard<std::mutex> lock(d.mu);
      memory_mb = d.functions.at(name).spec.memory_mb;
    }
    grpc::ClientContext ctx;
    rpc::set_deadline(ctx, d.opt.invoke_timeout);
    proto::InvokeReply reply;
    Stopwatch watch;
    grpc::Status st = in->stub->Invoke(&ctx, req, &reply);
    const double seconds = watch.seconds();
    {
      std::lock_guard<std::mutex> lock(d.mu);
      d.meter->record(name, memory_mb, seconds);  // billed whether it worked or not
    }
    result.cold_start = result.cold_start || cold;
    result.attempts = attempt + 1;
    if (st.ok()) {
      d.release(in);
      result.seconds = seconds;
      result.compute_seconds = reply.compute_seconds();
      if (reply.has_outputs() && reply.outputs().shape_size() > 0)
        result.outputs = rpc::from_proto(reply.outputs());
      return result;
    }
    const auto code = st.error_code();
    if (code == grpc::StatusCode::INVALID_ARGUMENT ||
        code == grpc::StatusCode::RESOURCE_EXHAUSTED || code == grpc::StatusCode::NOT_FOUND) {
      d.release(in);
      rpc::check(st, "invoke " + name, "127.0.0.1:" + std::to_string(in->port));
    }
    // The instance died or hung: remove it and try another.
    last_error = st.error_message();
    TESSERA_LOG(Warn, "moe") << "function '" << name << "' instance (pid " << in->pid
                             << ") failed mid-request: " << last_error
                             << (attempt < d.opt.retries ? "; retrying" : "");
    d.remove(name, in);
    std::lock_guard<std::mutex> lock(d.mu);
    if (attempt < d.opt.retries) ++d.stats.retries;
  }
  throw Unavailable(detail::concat("function '", name, "': the request failed on ",
                                   d.opt.retries + 1, " instances (last: ", last_error, ")"));
}

std::string FunctionPlatform::storage_key(const std::string& name) const { return name; }

void FunctionPlatform::put(const std::string& key, const at::Tensor& x) {
  impl_->channel->put(key, x);
}

at::Tensor FunctionPlatform::get(const std::string& key, std::chrono::milliseconds wait) {
  return impl_->channel->get(key, wait);
}

void FunctionPlatform::remove(const std::string& key) { impl_->channel->remove(key); }

BillingMeter& FunctionPlatform::meter() { return *impl_->meter; }

FunctionPlatform::Stats FunctionPlatform::stats() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Stats s = impl_->stats;
  s.instances = 0;
  for (const auto& [name, f] : impl_->functions)
    s.instances += static_cast<int64_t>(f.instances.size());
  return s;
}

int FunctionPlatform::reclaim_idle() { return impl_->reclaim_idle(); }

std::vector<long> FunctionPlatform::instance_pids(const std::string& name) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<long> out;
  auto it = impl_->functions.find(name);
  if (it == impl_->functions.end()) return out;
  for (const auto& in : it->second.instances) {
    if (in->pid > 0) out.push_back(in->pid);
  }
  return out;
}

const PlatformOptions& FunctionPlatform::options() const { return impl_->opt; }

// --- The gate ------------------------------------------------------------------

Routing route(const ExpertLayer& layer, const at::Tensor& x) {
  return translate_errors(
      "moe route",
      [&]() -> Routing {
        auto file = nn::SafetensorsFile::open(layer.weights);
        at::Tensor gate = file.get(layer.prefix + "gate.weight").to(at::kFloat);
        at::Tensor probs = at::softmax(at::matmul(x, gate.t()), -1);
        auto [w, e] = probs.topk(layer.top_k, -1);
        if (layer.normalize_top_k) w = w / w.sum(-1, true);
        return {e, w};
      },
      ErrorCode::kInvalidArgument);
}

namespace {
// Token rows and weights of each expert, in token order.
struct Assignment {
  at::Tensor rows, weights;
};
std::vector<Assignment> assignments(const Routing& r, int64_t experts) {
  std::vector<Assignment> out(experts);
  at::Tensor flat_e = r.experts.reshape({-1});
  at::Tensor flat_w = r.weights.reshape({-1});
  at::Tensor token = at::arange(r.experts.size(0), at::kLong).repeat_interleave(r.experts.size(1));
  for (int64_t e = 0; e < experts; ++e) {
    at::Tensor sel = (flat_e == e).nonzero().squeeze(1);
    out[e] = {token.index_select(0, sel), flat_w.index_select(0, sel)};
  }
  return out;
}
}  // namespace

at::Tensor moe_layer_reference(const ExpertLayer& layer, const at::Tensor& x,
                               const Routing& routing) {
  return translate_errors(
      "moe moe_layer_reference",
      [&]() -> at::Tensor {
        auto file = nn::SafetensorsFile::open(layer.weights);
        at::Tensor out = at::zeros_like(x);
        auto parts = assignments(routing, layer.num_experts);
        for (int64_t e = 0; e < layer.num_experts; ++e) {
          if (parts[e].rows.numel() == 0) continue;
          const std::string p = layer.prefix + "experts." + std::to_string(e) + ".";
          at::Tensor xe = x.index_select(0, parts[e].rows);
          at::Tensor h = at::silu(at::matmul(xe, file.get(p + "w1.weight").t())) *
                         at::matmul(xe, file.get(p + "w3.weight").t());
          out.index_add_(
              0, parts[e].rows,
              at::matmul(h, file.get(p + "w2.weight").t()) * parts[e].weights.unsqueeze(1));
        }
        return out;
      },
      ErrorCode::kInvalidArgument);
}

ServerlessMoE::ServerlessMoE(FunctionPlatform& platform, ExpertLayer layer, std::string name)
    : platform_(platform), layer_(std::move(layer)), name_(std::move(name)) {}

void ServerlessMoE::configure(const LayerPlan& plan, const PlatformProfile& profile) {
  TESSERA_CHECK(static_cast<int64_t>(plan.experts.size()) == layer_.num_experts, InvalidArgument,
                name_, ": plan for ", plan.experts.size(), " experts, the layer has ",
                layer_.num_experts);
  plan_ = plan;
  for (int64_t e = 0; e < layer_.num_experts; ++e) {
    platform_.deploy(name_ + ".expert" + std::to_string(e),
                     {layer_.weights, layer_.prefix + "experts." + std::to_string(e) + ".",
                      profile.memory_mb.at(plan.experts[e].memory_index)});
  }
}

at::Tensor ServerlessMoE::forward(const at::Tensor& x, const Routing& routing, Stats* stats) {
  return translate_errors(
      "moe ServerlessMoE::forward",
      [&]() -> at::Tensor {
        TESSERA_CHECK(!plan_.experts.empty(), FailedPrecondition, name_,
                      ": configure() before forward()");
        Stopwatch watch;
        const uint64_t call = ++calls_;
        auto parts = assignments(routing, layer_.num_experts);
        struct Piece {
          at::Tensor rows, weights;
          std::future<at::Tensor> out;
        };
        std::vector<Piece> pieces;
        std::atomic<int64_t> invocations{0}, fallbacks{0};
        for (int64_t e = 0; e < layer_.num_experts; ++e) {
          const int64_t n = parts[e].rows.numel();
          if (n == 0) continue;
          const std::string fn = name_ + ".expert" + std::to_string(e);
          const int replicas =
              std::max(1, std::min<int>(plan_.experts[e].replicas, static_cast<int>(n)));
          const int64_t per = (n + replicas - 1) / replicas;
          for (int r = 0; r < replicas; ++r) {
            const int64_t b = r * per, len = std::min(per, n - b);
            if (len <= 0) break;
            Piece piece{parts[e].rows.narrow(0, b, len), parts[e].weights.narrow(0, b, len), {}};
            at::Tensor xe = x.index_select(0, piece.rows).contiguous();
            const std::string key =
                platform_.storage_key(detail::concat(name_, ".", call, ".e", e, ".r", r));
            const Method method = plan_.method;
            const int64_t beta = std::max<int64_t>(plan_.beta, 1);
            piece.out = std::async(
                std::launch::async, [this, fn, xe, key, method, beta, &invocations, &fallbacks] {
                  ++invocations;
                  auto indirect = [&] {
                    platform_.put(key, xe);
                    platform_.invoke(fn, {at::Tensor(), {key}, std::chrono::seconds(30)});
                    at::Tensor y = platform_.get(key + ".out");
                    platform_.remove(key);
                    platform_.remove(key + ".out");
                    return y;
                  };
                  if (method == Method::kDirect) {
                    try {
                      return platform_.invoke(fn, {xe, {}, std::chrono::seconds(0)}).outputs;
                    } catch (const ResourceExhausted&) {
                      ++fallbacks;  // over the payload limit: through storage instead
                      return indirect();
                    }
                  }
                  if (method == Method::kIndirect) return indirect();
                  // Pipelined: the invocation starts first and reads minibatches as
                  // they are written.
                  std::vector<std::string> keys;
                  for (int64_t b = 0; b < xe.size(0); b += beta)
                    keys.push_back(key + ".b" + std::to_string(b / beta));
                  auto call = std::async(std::launch::async, [&] {
                    return platform_.invoke(fn, {at::Tensor(), keys, std::chrono::seconds(30)});
                  });
                  for (size_t i = 0; i < keys.size(); ++i) {
                    const int64_t b = static_cast<int64_t>(i) * beta;
                    platform_.put(keys[i], xe.narrow(0, b, std::min(beta, xe.size(0) - b)));
                  }
                  call.get();  // every output is written before the function returns
                  std::vector<at::Tensor> ys;
                  for (const auto& k : keys) ys.push_back(platform_.get(k + ".out"));
                  for (const auto& k : keys) {
                    platform_.remove(k);
                    platform_.remove(k + ".out");
                  }
                  return at::cat(ys, 0);
                });
            pieces.push_back(std::move(piece));
          }
        }
        at::Tensor out = at::zeros_like(x);
        std::exception_ptr error;
        std::vector<at::Tensor> results(pieces.size());
        for (size_t i = 0; i < pieces.size(); ++i) {
          try {
            results[i] = pieces[i].out.get();
          } catch (...) {
            if (!error) error = std::current_exception();
          }
        }
        if (error) std::rethrow_exception(error);
        for (size_t i = 0; i < pieces.size(); ++i) {
          out.index_add_(0, pieces[i].rows, results[i] * pieces[i].weights.unsqueeze(1));
        }
        if (stats) {
          stats->seconds = watch.seconds();
          stats->invocations = invocations;
          stats->fallbacks = fallbacks;
        }
        return out;
      },
      ErrorCode::kInvalidArgument);
}

PlatformProfile calibrate_platform(FunctionPlatform& platform, const ExpertLayer& layer,
                                   int64_t hidden, int64_t intermediate, int concurrency) {
  const PriceSheet& prices = platform.options().prices;
  PlatformProfile p;
  p.memory_mb = prices.memory_sizes_mb;
  p.input_bytes_per_token = p.output_bytes_per_token = hidden * 4;
  p.expert_weight_bytes = 3 * hidden * intermediate * 4;
  p.intermediate_bytes_per_token = 2 * intermediate * 4;
  const std::string prefix = layer.prefix + "experts.0.";
  const at::Tensor tokens = at::randn({512, hidden});
  const at::Tensor one = at::randn({1, hidden});
  double head = 0;
  for (int64_t m : p.memory_mb) {
    const std::string fn = "calibrate." + std::to_string(m);
    platform.deploy(fn, {layer.weights, prefix, m});
    Stopwatch cold;
    platform.invoke(fn, {one, {}, std::chrono::seconds(0)});  // cold start
    const double cold_seconds = cold.seconds();
    Stopwatch warm;
    platform.invoke(fn, {one, {}, std::chrono::seconds(0)});
    p.cold_start = std::max(p.cold_start, cold_seconds - warm.seconds());
    double compute = 1e30;
    for (int r = 0; r < 3; ++r) {
      // `concurrency` invocations at once (instances of the same function).
      std::vector<std::future<FunctionPlatform::Result>> calls;
      for (int c = 0; c < concurrency; ++c) {
        calls.push_back(std::async(std::launch::async, [&] {
          return platform.invoke(fn, {tokens, {}, std::chrono::seconds(0)});
        }));
      }
      double worst = 0;
      for (auto& c : calls) worst = std::max(worst, c.get().compute_seconds);
      compute = std::min(compute, worst);
    }
    p.t_cal.push_back(compute / 512.0);
    if (m == p.memory_mb.back()) {
      double best = 1e30;
      for (int r = 0; r < 5; ++r) {
        auto res = platform.invoke(fn, {one, {}, std::chrono::seconds(0)});
        best = std::min(best, res.seconds - res.compute_seconds);
      }
      head = best;
      // Call bandwidth: a large direct payload, minus the small one's time.
      const int64_t n = std::max<int64_t>(1, prices.payload_limit_bytes / (hidden * 4) / 2);
      auto big = platform.invoke(fn, {at::randn({n, hidden}), {}, std::chrono::seconds(0)});
      const double transfer = std::max(1e-6, big.seconds - big.compute_seconds - head);
      p.call_bandwidth = static_cast<double>(2 * n * hidden * 4) / transfer;
    }
  }
  p.t_head = head;
  // Storage channel: a tiny object's round trip is the latency, a large
  // one's the bandwidth.
  const std::string key = platform.storage_key("calibrate.storage");
  Stopwatch small;
  for (int r = 0; r < 10; ++r) {
    platform.put(key, one);
    platform.get(key);
  }
  p.t_dl = small.seconds() / 20;
  const at::Tensor big = at::randn({int64_t{1} << 20, 16});  // 64 MiB
  Stopwatch large;
  platform.put(key, big);
  platform.get(key);
  p.storage_bandwidth =
      2.0 * static_cast<double>(big.nbytes()) / std::max(1e-6, large.seconds() - 2 * p.t_dl);
  platform.remove(key);
  // Per-minibatch latency as a pipelined function sees it (waiting for the
  // object, reading, writing its output): 16 minibatches of one token.
  {
    const std::string fn = "calibrate." + std::to_string(p.memory_mb.back());
    std::vector<std::string> keys;
    for (int b = 0; b < 16; ++b)
      keys.push_back(platform.storage_key("calibrate.block" + std::to_string(b)));
    for (const auto& k : keys) platform.put(k, one);
    auto res = platform.invoke(fn, {at::Tensor(), keys, std::chrono::seconds(5)});
    p.t_dl = std::max(p.t_dl, (res.seconds - res.compute_seconds - p.t_head) / (2.0 * keys.size()));
    for (const auto& k : keys) {
      platform.remove(k);
      platform.remove(k + ".out");
    }
  }
  return p;
}

}  // namespace tessera::moe
