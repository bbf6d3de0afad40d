#include "tessera/core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include "tessera/core/error.h"

namespace tessera::log {
namespace {

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::kTrace:
      return spdlog::level::trace;
    case Level::kDebug:
      return spdlog::level::debug;
    case Level::kInfo:
      return spdlog::level::info;
    case Level::kWarn:
      return spdlog::level::warn;
    case Level::kError:
      return spdlog::level::err;
    case Level::kOff:
      return spdlog::level::off;
  }
  return spdlog::level::info;
}

// Process-wide logging state. One instance, created on first use.
class Registry {
 public:
  static Registry& get() {
    static Registry registry;
    return registry;
  }

  bool enabled(std::string_view module, Level level) {
    std::lock_guard<std::mutex> lock(mu_);
    return level != Level::kOff && level >= level_for(module);
  }

  void write(std::string_view module, Level level, const std::string& message) {
    std::shared_ptr<spdlog::logger> logger;
    {
      std::lock_guard<std::mutex> lock(mu_);
      logger = logger_for(module);
    }
    logger->log(to_spdlog(level), message);
  }

  void set_level(Level level, std::string_view module) {
    std::lock_guard<std::mutex> lock(mu_);
    if (module.empty()) {
      default_level_ = level;
      module_levels_.clear();
    } else {
      module_levels_[std::string(module)] = level;
    }
  }

  void set_rank(int rank) {
    std::lock_guard<std::mutex> lock(mu_);
    rank_ = rank;
    for (auto& [name, logger] : loggers_) logger->set_pattern(pattern());
  }

 private:
  Registry() : sink_(std::make_shared<spdlog::sinks::stderr_color_sink_mt>()) {
    if (const char* spec = std::getenv("TESSERA_LOG_LEVEL"); spec && *spec) {
      try {
        apply_spec(spec);
      } catch (const Error& e) {
        // A bad variable must not take the program down; say so once.
        default_level_ = Level::kInfo;
        logger_for("core")->warn("ignoring TESSERA_LOG_LEVEL: {}", e.message());
      }
    }
  }

 public:
  void apply_spec(std::string_view spec) {
    Level new_default = default_level_;
    std::map<std::string, Level, std::less<>> overrides;
    size_t start = 0;
    while (start <= spec.size()) {
      size_t comma = spec.find(',', start);
      std::string_view item =
          spec.substr(start, comma == std::string_view::npos ? spec.npos : comma - start);
      if (!item.empty()) {
        size_t eq = item.find('=');
        if (eq == std::string_view::npos) {
          new_default = parse_level(item);
        } else {
          overrides[std::string(item.substr(0, eq))] = parse_level(item.substr(eq + 1));
        }
      }
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }
    std::lock_guard<std::mutex> lock(mu_);
    default_level_ = new_default;
    module_levels_ = std::move(overrides);
  }

 private:
  Level level_for(std::string_view module) const {
    auto it = module_levels_.find(module);
    return it == module_levels_.end() ? default_level_ : it->second;
  }

  std::string pattern() const {
    std::string rank = rank_ >= 0 ? "[rank " + std::to_string(rank_) + "] " : "";
    return "[%H:%M:%S.%e] " + rank + "[%n] [%^%l%$] %v";
  }

  // Requires mu_.
  std::shared_ptr<spdlog::logger> logger_for(std::string_view module) {
    auto it = loggers_.find(module);
    if (it != loggers_.end()) return it->second;
    // Not registered with spdlog's global registry: the host program's
    // loggers and ours never collide by name.
    auto logger = std::make_shared<spdlog::logger>("tessera." + std::string(module), sink_);
    logger->set_pattern(pattern());
    logger->set_level(spdlog::level::trace);  // filtering happens in enabled()
    loggers_.emplace(std::string(module), logger);
    return logger;
  }

  std::mutex mu_;
  Level default_level_ = Level::kInfo;                       // guarded by mu_
  std::map<std::string, Level, std::less<>> module_levels_;  // guarded by mu_
  int rank_ = -1;                                            // guarded by mu_
  std::shared_ptr<spdlog::sinks::sink> sink_;
  std::map<std::string, std::shared_ptr<spdlog::logger>, std::less<>> loggers_;  // guarded by mu_
};

}  // namespace

Level parse_level(std::string_view text) {
  std::string lower(text);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (lower == "trace") return Level::kTrace;
  if (lower == "debug") return Level::kDebug;
  if (lower == "info") return Level::kInfo;
  if (lower == "warn" || lower == "warning") return Level::kWarn;
  if (lower == "error") return Level::kError;
  if (lower == "off") return Level::kOff;
  TESSERA_THROW(InvalidArgument, "unknown log level '", text,
                "' (expected trace, debug, info, warn, error or off)");
}

void set_level(Level level, std::string_view module) { Registry::get().set_level(level, module); }
void configure(std::string_view spec) { Registry::get().apply_spec(spec); }
void set_rank(int rank) { Registry::get().set_rank(rank); }
bool enabled(std::string_view module, Level level) {
  return Registry::get().enabled(module, level);
}
void write(std::string_view module, Level level, const std::string& message) {
  Registry::get().write(module, level, message);
}

}  // namespace tessera::log
