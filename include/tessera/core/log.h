// tessera/core/log.h — per-module logging.
//
// Each module logs through its own named logger ("tessera.dist", ...). The
// level comes from TESSERA_LOG_LEVEL (read once, at first use) or from
// set_level(). TESSERA_LOG_LEVEL takes a default level and optional
// per-module overrides: "info", "warn,dist=debug". Once dist knows the rank,
// every line is prefixed with it. Output goes to stderr through spdlog; the
// host program's own default spdlog logger is never replaced.
//
// The level is checked before the message is formatted:
//   TESSERA_LOG(Info, "dist") << "rendezvous done in " << ms << " ms";
//
// Thread-safe.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace tessera::log {

enum class Level { kTrace, kDebug, kInfo, kWarn, kError, kOff };

// Parses "trace", "debug", "info", "warn", "error", "off" (case-insensitive).
// Throws InvalidArgument naming the text otherwise.
Level parse_level(std::string_view text);

// Sets the level of every module (module empty) or of one module.
void set_level(Level level, std::string_view module = {});

// Applies a TESSERA_LOG_LEVEL-style spec ("warn,dist=debug").
void configure(std::string_view spec);

// Sets the rank shown in front of every line; -1 removes the prefix.
void set_rank(int rank);

bool enabled(std::string_view module, Level level);
void write(std::string_view module, Level level, const std::string& message);

// One log line; written when destroyed. Use through TESSERA_LOG.
class Line {
 public:
  Line(std::string_view module, Level level) : module_(module), level_(level) {}
  Line(const Line&) = delete;
  Line& operator=(const Line&) = delete;
  ~Line() { write(module_, level_, stream_.str()); }
  std::ostringstream& stream() { return stream_; }

 private:
  std::string_view module_;
  Level level_;
  std::ostringstream stream_;
};

}  // namespace tessera::log

#define TESSERA_LOG(LEVEL, module)                                         \
  if (!::tessera::log::enabled(module, ::tessera::log::Level::k##LEVEL)) { \
  } else                                                                   \
    ::tessera::log::Line(module, ::tessera::log::Level::k##LEVEL).stream()
