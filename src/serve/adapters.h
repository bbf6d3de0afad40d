// Internal to the serving engine: the adapters requests may name.
//
// Names map to PEFT / MoS folders. At most `max_resident` adapters are kept
// loaded by the registry (least recently used dropped first, reloaded from
// their folder on next use); a request holds its own reference for its
// lifetime, so dropping or unloading never disturbs a running request.
// Every load of a name under a new folder gets a new generation, which goes
// into the prefix-cache salt: KV computed under one adapter is never reused
// under another.
//
// Thread-safety: thread-safe (one mutex; loads happen under it).
#pragma once

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "tessera/lora/lora.h"

namespace tessera::serve::detail {

class AdapterRegistry {
 public:
  // `base` must outlive the registry. InvalidArgument: max_resident < 1.
  AdapterRegistry(const nn::Transformer& base, int64_t max_resident);

  // Loads `path` as adapter `name` now (so a bad folder is reported here).
  // InvalidArgument: an empty or taken name, or a folder that is not an
  // adapter of the base model (the message names the folder and why).
  void load(const std::string& name, const std::string& path);
  // NotFound for an unknown name.
  void unload(const std::string& name);

  struct Acquired {
    std::shared_ptr<lora::Adapter> adapter;
    std::string salt;  // "adapter:<name>#<generation>"
  };
  // The adapter for a request, loaded again if it was dropped.
  // InvalidArgument: unknown name (listing the known ones).
  Acquired acquire(const std::string& name);

  std::vector<std::string> names() const;     // sorted
  std::vector<std::string> resident() const;  // most recently used first
  int64_t loads() const;

 private:
  struct Entry {
    std::string path;
    int64_t generation = 0;
  };
  std::shared_ptr<lora::Adapter> load_locked(const std::string& name, const Entry& entry);
  void touch_locked(const std::string& name, std::shared_ptr<lora::Adapter> adapter);

  const nn::Transformer& base_;
  const size_t max_resident_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;  // guarded by mu_
  // Most recently used first; at most max_resident_.  Guarded by mu_.
  std::list<std::pair<std::string, std::shared_ptr<lora::Adapter>>> lru_;
  int64_t next_generation_ = 0;  // guarded by mu_
  int64_t loads_ = 0;            // guarded by mu_
};

}  // namespace tessera::serve::detail
