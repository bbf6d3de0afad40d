// tessera/synth/jsonl.h — append-only JSON Lines files: how every stage of
// the synthesis pipeline keeps its results, so that a crash loses at most
// the work in flight.
//
// A record is one JSON object on one line. append() writes whole lines and
// fsyncs before returning, so a record that append() returned for survives a
// crash. A crash during append() can leave a last line without its newline;
// open() drops such a line (and truncates it away, logging a warning), since
// its record was never acknowledged. A complete line that is not a JSON
// object is corruption and raises DataLoss naming the file and line.
//
//   auto log = tessera::synth::JsonlLog::open(dir + "/samples.jsonl");
//   std::set<std::string> done;                       // resume: skip what is there
//   for (const auto& r : log.records()) done.insert(id_of(r));
//   log.append({R"({"id":"p3-0","text":"What is 3 + 4?"})"});
//
// Thread safety: thread-compatible (one writer per file; records() may be
// read concurrently with nothing else).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace tessera::synth {

class JsonlLog {
 public:
  // Opens `path`, creating it and its parent folders when missing, and reads
  // its records. DataLoss for a malformed complete line ("<path>:<line>:
  // ..."); I/O errors per tessera::throw_io_error.
  static JsonlLog open(const std::string& path);
  JsonlLog(JsonlLog&&) noexcept;
  JsonlLog& operator=(JsonlLog&&) noexcept;
  ~JsonlLog();

  const std::string& path() const;
  // Every record, in file order (the JSON text of each line).
  const std::vector<std::string>& records() const;
  int64_t size() const;
  // Appends and fsyncs. InvalidArgument (nothing written) when a record is
  // not one JSON object or contains a raw newline.
  void append(const std::vector<std::string>& records);
  void append(const std::string& record);

 private:
  struct Impl;
  explicit JsonlLog(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Writes `content` to `path` atomically (temporary file, fsync, rename,
// directory fsync), creating parent folders.
void write_file_atomic(const std::string& path, const std::string& content);
// The file's bytes, or nullopt when it does not exist.
std::optional<std::string> read_file_if_exists(const std::string& path);

}  // namespace tessera::synth
