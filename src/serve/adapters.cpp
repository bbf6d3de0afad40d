#include "adapters.h"

#include <ATen/core/grad_mode.h>

#include "tessera/core/error.h"

namespace tessera::serve::detail {

AdapterRegistry::AdapterRegistry(const nn::Transformer& base, int64_t max_resident)
    : base_(base), max_resident_(static_cast<size_t>(std::max<int64_t>(max_resident, 0))) {
  TESSERA_CHECK(max_resident >= 1, InvalidArgument,
                "engine: max_loaded_adapters must be >= 1, got ", max_resident);
}

std::shared_ptr<lora::Adapter> AdapterRegistry::load_locked(const std::string& name,
                                                            const Entry& entry) {
  at::NoGradGuard no_grad;
  std::shared_ptr<lora::Adapter> adapter;
  try {
    adapter = lora::load_adapter(entry.path, base_);
  } catch (const Error& e) {
    TESSERA_THROW(InvalidArgument, "adapter '", name, "': '", entry.path,
                  "' is not an adapter of this model: ", e.what());
  }
  adapter->set_training(false);
  ++loads_;
  return adapter;
}

void AdapterRegistry::touch_locked(const std::string& name,
                                   std::shared_ptr<lora::Adapter> adapter) {
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    if (it->first == name) {
      lru_.erase(it);
      break;
    }
  }
  lru_.emplace_front(name, std::move(adapter));
  while (lru_.size() > max_resident_) lru_.pop_back();
}

void AdapterRegistry::load(const std::string& name, const std::string& path) {
  TESSERA_CHECK(!name.empty(), InvalidArgument, "adapter name must not be empty");
  std::lock_guard<std::mutex> lock(mu_);
  TESSERA_CHECK(entries_.count(name) == 0, InvalidArgument, "adapter name '", name,
                "' is already in use (unload it first)");
  Entry entry{path, next_generation_};
  auto adapter = load_locked(name, entry);
  ++next_generation_;
  entries_.emplace(name, entry);
  touch_locked(name, std::move(adapter));
}

void AdapterRegistry::unload(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  TESSERA_CHECK(entries_.erase(name) == 1, NotFound, "no adapter named '", name, "' is loaded");
  lru_.remove_if([&](const auto& e) { return e.first == name; });
}

AdapterRegistry::Acquired AdapterRegistry::acquire(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    std::string known;
    for (const auto& [n, e] : entries_) known += (known.empty() ? "" : ", ") + n;
    TESSERA_THROW(InvalidArgument, "unknown adapter '", name,
                  "' (loaded: ", known.empty() ? "none" : known, ")");
  }
  std::shared_ptr<lora::Adapter> adapter;
  for (const auto& [n, a] : lru_) {
    if (n == name) adapter = a;
  }
  if (!adapter) adapter = load_locked(name, it->second);
  touch_locked(name, adapter);
  return {adapter, "adapter:" + name + "#" + std::to_string(it->second.generation)};
}

std::vector<std::string> AdapterRegistry::names() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [n, e] : entries_) out.push_back(n);
  return out;
}

std::vector<std::string> AdapterRegistry::resident() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  for (const auto& [n, a] : lru_) out.push_back(n);
  return out;
}

int64_t AdapterRegistry::loads() const {
  std::lock_guard<std::mutex> lock(mu_);
  return loads_;
}

}  // namespace tessera::serve::detail
