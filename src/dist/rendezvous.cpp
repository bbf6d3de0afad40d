#include "tessera/dist/rendezvous.h"

#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <thread>

#include "c10d_compat.h"
#include "tessera/core/error.h"
#include "tessera/core/log.h"
#include "tessera/core/metrics.h"

namespace tessera::dist {
namespace {

// Value of the first variable of `names` that is set; nullptr when none.
const char* first_env(std::initializer_list<const char*> names, const char** which) {
  for (const char* n : names) {
    const char* v = std::getenv(n);
    if (v && *v) {
      *which = n;
      return v;
    }
  }
  return nullptr;
}

int parse_int_env(const char* name, const char* value, int min, int max) {
  char* end = nullptr;
  long v = std::strtol(value, &end, 10);
  TESSERA_CHECK(end && *end == '\0' && v >= min && v <= max, InvalidArgument, "environment: ", name,
                "='", value, "' is not an integer in [", min, ", ", max, "]");
  return static_cast<int>(v);
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

std::string store_error_text(const std::exception& e) {
  std::string text = e.what();
  if (auto nl = text.find('\n'); nl != std::string::npos) text.resize(nl);
  return text;
}

}  // namespace

EnvInfo EnvInfo::from_env() {
  EnvInfo info;
  const char* which = nullptr;
  const char* rank = first_env({"RANK", "SLURM_PROCID"}, &which);
  const char* rank_var = which;
  const char* world = first_env({"WORLD_SIZE", "SLURM_NTASKS"}, &which);
  const char* world_var = which;
  if (!rank && !world) return info;  // a single process
  TESSERA_CHECK(rank && world, InvalidArgument, "environment: ", rank ? rank_var : world_var,
                " is set but ", rank ? "WORLD_SIZE" : "RANK", " is not");
  info.distributed = true;
  info.world_size = parse_int_env(world_var, world, 1, INT_MAX);
  info.rank = parse_int_env(rank_var, rank, 0, info.world_size - 1);
  if (const char* v = first_env({"LOCAL_RANK", "SLURM_LOCALID"}, &which)) {
    info.local_rank = parse_int_env(which, v, 0, info.world_size - 1);
  } else {
    info.local_rank = info.rank;
  }
  if (const char* v = first_env({"LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"}, &which)) {
    // Slurm may write "4(x2)"; the leading number is the per-node count.
    info.local_world_size = std::atoi(v) > 0 ? std::atoi(v) : info.world_size;
  } else {
    info.local_world_size = info.world_size;
  }
  if (const char* v = std::getenv("MASTER_ADDR"); v && *v) info.master_addr = v;
  if (const char* v = std::getenv("MASTER_PORT"); v && *v) {
    info.master_port = parse_int_env("MASTER_PORT", v, 1, 65535);
  }
  return info;
}

// ---------------------------------------------------------------------------
// Store

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::~Store() = default;

std::shared_ptr<Store> Store::tcp(const std::string& host, int port, bool is_server,
                                  std::chrono::milliseconds timeout) {
  ::c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(port);
  opts.isServer = is_server;
  opts.waitWorkers = false;  // arrival is checked by rendezvous_barrier
  opts.timeout = timeout;
  auto impl = std::make_unique<Impl>();
  try {
    impl->store = c10::make_intrusive<::c10d::TCPStore>(host, opts);
  } catch (const std::exception& e) {
    std::string text = store_error_text(e);
    if (is_server) {
      TESSERA_THROW(Unavailable, "rank 0 cannot serve the rendezvous store on ", host, ":", port,
                    ": ", text);
    }
    TESSERA_THROW(DeadlineExceeded, "cannot reach the rendezvous store at ", host, ":", port,
                  " within ", timeout.count() / 1000.0, " s (is rank 0 running?): ", text);
  }
  return std::make_shared<Store>(std::move(impl));
}

std::shared_ptr<Store> Store::in_memory() {
  auto impl = std::make_unique<Impl>();
  impl->store = c10::make_intrusive<::c10d::HashStore>();
  return std::make_shared<Store>(std::move(impl));
}

std::shared_ptr<Store> Store::prefixed(std::shared_ptr<Store> base, const std::string& prefix) {
  auto impl = std::make_unique<Impl>();
  impl->store = c10::make_intrusive<::c10d::PrefixStore>(prefix, base->impl().store);
  return std::make_shared<Store>(std::move(impl));
}

void Store::set(const std::string& key, const std::string& value) {
  translate_errors(
      "store set '" + key + "'",
      [&] { impl_->store->set(key, std::vector<uint8_t>(value.begin(), value.end())); },
      ErrorCode::kUnavailable);
}

std::string Store::get(const std::string& key) {
  auto bytes = translate_errors(
      "store get '" + key + "'", [&] { return impl_->store->get(key); },
      ErrorCode::kDeadlineExceeded);
  return std::string(bytes.begin(), bytes.end());
}

int64_t Store::add(const std::string& key, int64_t delta) {
  return translate_errors(
      "store add '" + key + "'", [&] { return impl_->store->add(key, delta); },
      ErrorCode::kUnavailable);
}

bool Store::check(const std::vector<std::string>& keys) {
  return translate_errors(
      "store check", [&] { return impl_->store->check(keys); }, ErrorCode::kUnavailable);
}

std::chrono::milliseconds Store::timeout() const { return impl_->store->getTimeout(); }

// ---------------------------------------------------------------------------
// Rendezvous

void rendezvous_barrier(Store& store, const std::string& tag, int rank, int world_size,
                        std::chrono::milliseconds timeout) {
  const std::string base = "tessera/rdzv/" + tag + "/";
  int64_t claims = store.add(base + "rank/" + std::to_string(rank), 1);
  TESSERA_CHECK(claims == 1, InvalidArgument, "rendezvous '", tag, "': rank ", rank,
                " checked in twice (two processes were given RANK=", rank, ")");
  store.add(base + "arrived", 1);
  Stopwatch watch;
  auto pause = std::chrono::milliseconds(1);
  for (;;) {
    if (store.add(base + "arrived", 0) >= world_size) return;
    if (watch.seconds() * 1000 > static_cast<double>(timeout.count())) break;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(100));
  }
  std::string missing;
  int n_missing = 0;
  for (int r = 0; r < world_size; ++r) {
    if (!store.check({base + "rank/" + std::to_string(r)})) {
      if (n_missing < 16) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      ++n_missing;
    }
  }
  if (n_missing > 16) missing += ", ...";
  TESSERA_THROW(DeadlineExceeded, "rendezvous '", tag, "' timed out after ",
                timeout.count() / 1000.0, " s: ", world_size - n_missing, " of ", world_size,
                " ranks arrived; missing rank", n_missing == 1 ? " " : "s ", missing);
}

std::shared_ptr<ProcessGroup> init_process_group(const InitOptions& options) {
  EnvInfo env = EnvInfo::from_env();
  InitOptions opts = options;
  if (const char* v = std::getenv("TESSERA_RDZV_TIMEOUT"); v && *v) {
    opts.rendezvous_timeout =
        std::chrono::milliseconds(static_cast<int64_t>(std::atof(v) * 1000.0));
  }
  if (opts.group.gloo_interface.empty() && opts.group.gloo_address.empty()) {
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
      opts.group.gloo_interface = ifname;
    } else if (!env.distributed || is_loopback(env.master_addr) ||
               env.local_world_size == env.world_size) {
      opts.group.gloo_address = "127.0.0.1";
    }
  }
  if (const char* b = std::getenv("TESSERA_DIST_BACKEND"); b && *b) {
    std::string name = b;
    TESSERA_CHECK(name == "gloo" || name == "nccl", InvalidArgument,
                  "TESSERA_DIST_BACKEND must be gloo or nccl, got '", name, "'");
    opts.group.backend = name == "nccl" ? Backend::kNccl : Backend::kGloo;
  }
  if (env.distributed) log::set_rank(env.rank);
  std::shared_ptr<Store> store;
  if (!env.distributed) {
    store = Store::in_memory();
  } else {
    store = Store::tcp(env.master_addr, env.master_port, env.rank == 0, opts.rendezvous_timeout);
    rendezvous_barrier(*store, "world", env.rank, env.world_size, opts.rendezvous_timeout);
  }
  auto group = ProcessGroup::create(store, env.rank, env.world_size, opts.group);
  TESSERA_LOG(Debug, "dist") << "joined world of " << env.world_size << " ranks via "
                             << env.master_addr << ":" << env.master_port;
  return group;
}

void run_thread_ranks(int world, const std::function<void(std::shared_ptr<ProcessGroup>)>& fn,
                      const ProcessGroupOptions& options) {
  TESSERA_CHECK(world >= 1, InvalidArgument, "run_thread_ranks: world must be >= 1, got ", world);
  if (world == 1) {
    fn(nullptr);
    return;
  }
  auto store = Store::in_memory();
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto group = ProcessGroup::create(store, r, world, options);
        fn(group);
        group->barrier().wait();
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace tessera::dist
