#include "tessera/moe/storage.h"

#include <ATen/ATen.h>
#ifdef TESSERA_WITH_REDIS
#include <hiredis/hiredis.h>
#endif

#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/formats/safetensors.h"
#include "tessera/rpc/rpc.h"

namespace tessera::moe {

namespace {

using Clock = std::chrono::steady_clock;

template <typename Try>
at::Tensor wait_for(const std::string& key, std::chrono::milliseconds wait, Try&& attempt) {
  // Saturates, so that milliseconds::max() ("wait for ever") or a negative
  // wait cannot overflow the clock arithmetic.
  const auto now = Clock::now();
  const auto until = wait <= std::chrono::milliseconds::zero() ? now
                     : wait >= std::chrono::duration_cast<std::chrono::milliseconds>(
                                   Clock::time_point::max() - now)
                         ? Clock::time_point::max()
                         : now + wait;
  auto pause = std::chrono::microseconds(100);
  while (true) {
    at::Tensor t = attempt();
    if (t.defined()) return t;
    TESSERA_CHECK(Clock::now() < until, NotFound, "storage object '", key, "' is missing",
                  wait.count() > 0 ? " (waited " + std::to_string(wait.count() / 1000.0) + " s)"
                                   : std::string());
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::microseconds(1000));
  }
}

class Files final : public StorageChannel {
 public:
  explicit Files(std::string dir) : dir_(std::move(dir)) {
    std::filesystem::create_directories(dir_);
  }
  void put(const std::string& key, const at::Tensor& x) override {
    nn::save_safetensors(path(key), {{"x", x}});
  }
  at::Tensor get(const std::string& key, std::chrono::milliseconds wait) override {
    return wait_for(key, wait, [&] {
      const std::string p = path(key);
      return std::filesystem::exists(p) ? nn::SafetensorsFile::open(p).get("x").clone()
                                        : at::Tensor();
    });
  }
  void remove(const std::string& key) override {
    std::error_code ec;
    std::filesystem::remove(path(key), ec);
  }
  std::string url() const override { return "files:" + dir_; }

 private:
  std::string path(const std::string& key) const {
    std::string safe;
    for (char c : key) safe += (c == '/' ? '_' : c);
    return dir_ + "/" + safe;
  }
  std::string dir_;
};

#ifdef TESSERA_WITH_REDIS
class Redis final : public StorageChannel {
 public:
  Redis(std::string host, int port) : host_(std::move(host)), port_(port) {
    timeval tv{5, 0};
    ctx_ = redisConnectWithTimeout(host_.c_str(), port_, tv);
    TESSERA_CHECK(ctx_ && !ctx_->err, Unavailable, "Redis at ", host_, ":", port_, ": ",
                  ctx_ ? ctx_->errstr : "cannot allocate a context");
  }
  ~Redis() override {
    if (ctx_) redisFree(ctx_);
  }
  void put(const std::string& key, const at::Tensor& x) override {
    rpc::TensorProto proto;
    rpc::to_proto(x, "x", &proto);
    const std::string value = proto.SerializeAsString();
    command("SET", [&] {
      return static_cast<redisReply*>(
          redisCommand(ctx_, "SET %b %b", key.data(), key.size(), value.data(), value.size()));
    });
  }
  at::Tensor get(const std::string& key, std::chrono::milliseconds wait) override {
    return wait_for(key, wait, [&] {
      at::Tensor t;
      command(
          "GET",
          [&] {
            return static_cast<redisReply*>(redisCommand(ctx_, "GET %b", key.data(), key.size()));
          },
          [&](redisReply* r) {
            if (r->type != REDIS_REPLY_STRING) return;
            rpc::TensorProto proto;
            TESSERA_CHECK(proto.ParseFromArray(r->str, static_cast<int>(r->len)), DataLoss,
                          "Redis object '", key, "' is not a tensor");
            t = rpc::from_proto(proto);
          });
      return t;
    });
  }
  void remove(const std::string& key) override {
    command("DEL", [&] {
      return static_cast<redisReply*>(redisCommand(ctx_, "DEL %b", key.data(), key.size()));
    });
  }
  std::string url() const override { return "redis://" + host_ + ":" + std::to_string(port_); }

 private:
  template <typename Send, typename Use = void (*)(redisReply*)>
  void command(
      const char* what, Send&& send, Use&& use = [](redisReply*) {}) {
    std::lock_guard<std::mutex> lock(mu_);
    redisReply* r = send();
    TESSERA_CHECK(r, Unavailable, "Redis ", what, " at ", host_, ":", port_, ": ", ctx_->errstr);
    std::unique_ptr<redisReply, void (*)(void*)> owned(r, freeReplyObject);
    TESSERA_CHECK(r->type != REDIS_REPLY_ERROR, Unavailable, "Redis ", what, ": ",
                  std::string(r->str, r->len));
    use(r);
  }
  std::string host_;
  int port_;
  redisContext* ctx_ = nullptr;
  std::mutex mu_;
};
#endif  // TESSERA_WITH_REDIS

}  // namespace

std::shared_ptr<StorageChannel> StorageChannel::open(const std::string& url) {
  if (url.rfind("files:", 0) == 0) return std::make_shared<Files>(url.substr(6));
  if (url.rfind("redis://", 0) == 0) {
    const std::string rest = url.substr(8);
    const size_t colon = rest.rfind(':');
    TESSERA_CHECK(colon != std::string::npos && colon > 0, InvalidArgument, "storage URL '", url,
                  "': expected redis://host:port");
#ifdef TESSERA_WITH_REDIS
    return std::make_shared<Redis>(rest.substr(0, colon), std::stoi(rest.substr(colon + 1)));
#else
    throw FailedPrecondition("storage URL '" + url +
                             "': this build has no Redis client (configure with libhiredis-dev "
                             "installed, or -DTESSERA_WITH_REDIS=ON)");
#endif
  }
  throw InvalidArgument("storage URL '" + url + "': expected files:<dir> or redis://host:port");
}

}  // namespace tessera::moe
