#include "tessera/synth/jsonl.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/core/log.h"

namespace tessera::synth {

namespace fs = std::filesystem;

struct JsonlLog::Impl {
  std::string path;
  std::vector<std::string> records;
  FileDescriptor fd;
};

namespace {

bool is_json_object(const std::string& text) {
  auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return !j.is_discarded() && j.is_object();
}

void make_parent(const std::string& path) {
  fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) return;
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw_io_error("creating " + parent.string(), ec.value());
}

void write_all(int fd, const std::string& bytes, const std::string& path) {
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_io_error("appending to " + path, errno);
    }
    done += static_cast<size_t>(n);
  }
}

}  // namespace

JsonlLog JsonlLog::open(const std::string& path) {
  make_parent(path);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  std::string bytes = read_file_if_exists(path).value_or("");
  size_t complete = bytes.rfind('\n');
  complete = complete == std::string::npos ? 0 : complete + 1;
  std::istringstream in(bytes.substr(0, complete));
  std::string line;
  int64_t number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    TESSERA_CHECK(is_json_object(line), DataLoss, path, ":", number, ": not a JSON object: '",
                  line.substr(0, 80), "'");
    impl->records.push_back(line);
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) throw_io_error("opening " + path, errno);
  impl->fd = FileDescriptor(fd);
  if (complete < bytes.size()) {
    // The last line never got its newline: a write cut short. Its record
    // was not acknowledged, so it is dropped.
    TESSERA_LOG(Warn, "synth") << path << ": dropping an incomplete last line of "
                               << bytes.size() - complete << " bytes (an interrupted write)";
    if (::ftruncate(fd, static_cast<off_t>(complete)) != 0)
      throw_io_error("truncating " + path, errno);
    if (::fsync(fd) != 0) throw_io_error("fsync " + path, errno);
  }
  return JsonlLog(std::move(impl));
}

JsonlLog::JsonlLog(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
JsonlLog::JsonlLog(JsonlLog&&) noexcept = default;
JsonlLog& JsonlLog::operator=(JsonlLog&&) noexcept = default;
JsonlLog::~JsonlLog() = default;

const std::string& JsonlLog::path() const { return impl_->path; }
const std::vector<std::string>& JsonlLog::records() const { return impl_->records; }
int64_t JsonlLog::size() const { return static_cast<int64_t>(impl_->records.size()); }

void JsonlLog::append(const std::vector<std::string>& records) {
  std::string bytes;
  for (const auto& r : records) {
    TESSERA_CHECK(r.find('\n') == std::string::npos, InvalidArgument, impl_->path,
                  ": a record contains a newline");
    TESSERA_CHECK(is_json_object(r), InvalidArgument, impl_->path, ": not a JSON object: '",
                  r.substr(0, 80), "'");
    bytes += r;
    bytes += '\n';
  }
  if (bytes.empty()) return;
  write_all(impl_->fd.get(), bytes, impl_->path);
  if (::fsync(impl_->fd.get()) != 0) throw_io_error("fsync " + impl_->path, errno);
  impl_->records.insert(impl_->records.end(), records.begin(), records.end());
}

void JsonlLog::append(const std::string& record) { append(std::vector<std::string>{record}); }

void write_file_atomic(const std::string& path, const std::string& content) {
  make_parent(path);
  AtomicFileWriter writer(path);
  writer.append(content.data(), content.size());
  writer.commit();
}

std::optional<std::string> read_file_if_exists(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (!fs::exists(path)) return std::nullopt;
    throw_io_error("reading " + path, errno == 0 ? EIO : errno);
  }
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace tessera::synth
