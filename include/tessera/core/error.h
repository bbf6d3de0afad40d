// tessera/core/error.h — the one exception type Tessera throws.
//
// Every failure that crosses Tessera's public API is a tessera::Error (or one
// of its subclasses). The code tells the caller what to do next, with the
// meanings abseil gives them:
//
//   kInvalidArgument    the caller passed something wrong; fix the input.
//   kNotFound           a file, tensor, key or rank that should exist does not.
//   kDataLoss           stored bytes are corrupt or truncated; do not retry.
//   kUnavailable        a peer or service is down; retrying the call may work.
//   kDeadlineExceeded   a timeout expired (rendezvous, collective, RPC).
//   kFailedPrecondition the object is in the wrong state; fix state first.
//   kResourceExhausted  a size or memory limit was hit.
//   kAborted            a multi-step operation was cut short; redo the step.
//   kInternal           a bug in Tessera or in a library below it.
//
// Messages name what failed and where ("safetensors header of model.st: ...",
// "rank 3: ..."), so that a log line alone tells the user what to look at.
//
// Example:
//   try {
//     auto cfg = tessera::ConfigObject::load_file("run.json");
//   } catch (const tessera::InvalidArgument& e) {
//     std::cerr << e.what() << "\n";   // "run.json: unknown key 'lr_warmup'"
//   }
#pragma once

#include <exception>
#include <sstream>
#include <string>
#include <utility>

namespace tessera {

enum class ErrorCode {
  kInvalidArgument,
  kNotFound,
  kDataLoss,
  kUnavailable,
  kDeadlineExceeded,
  kFailedPrecondition,
  kResourceExhausted,
  kAborted,
  kInternal,
};

// Short upper-case name of a code, e.g. "INVALID_ARGUMENT" (gRPC spelling).
const char* error_code_name(ErrorCode code);

// Base of every exception Tessera throws. Thread-compatible value type.
class Error : public std::exception {
 public:
  Error(ErrorCode code, std::string message);

  ErrorCode code() const noexcept { return code_; }
  // The message without the code prefix.
  const std::string& message() const noexcept { return message_; }
  // "INVALID_ARGUMENT: <message>".
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  ErrorCode code_;
  std::string message_;
  std::string what_;
};

#define TESSERA_DEFINE_ERROR(Name, Code)                                    \
  class Name : public Error {                                               \
   public:                                                                  \
    explicit Name(std::string message) : Error(Code, std::move(message)) {} \
  };

TESSERA_DEFINE_ERROR(InvalidArgument, ErrorCode::kInvalidArgument)
TESSERA_DEFINE_ERROR(NotFound, ErrorCode::kNotFound)
TESSERA_DEFINE_ERROR(DataLoss, ErrorCode::kDataLoss)
TESSERA_DEFINE_ERROR(Unavailable, ErrorCode::kUnavailable)
TESSERA_DEFINE_ERROR(DeadlineExceeded, ErrorCode::kDeadlineExceeded)
TESSERA_DEFINE_ERROR(FailedPrecondition, ErrorCode::kFailedPrecondition)
TESSERA_DEFINE_ERROR(ResourceExhausted, ErrorCode::kResourceExhausted)
TESSERA_DEFINE_ERROR(Aborted, ErrorCode::kAborted)
TESSERA_DEFINE_ERROR(Internal, ErrorCode::kInternal)
#undef TESSERA_DEFINE_ERROR

// Throws the subclass of Error that matches `code`.
[[noreturn]] void throw_error(ErrorCode code, std::string message);

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

namespace detail {
// Throws the Error that `e` (not a tessera::Error) becomes at a module
// boundary: `code`, or kResourceExhausted for allocation failures.
[[noreturn]] void rethrow_as_error(const std::exception& e, const std::string& where,
                                   ErrorCode code);
}  // namespace detail

// Runs `fn` and turns any exception that is not already a tessera::Error
// (c10::Error from LibTorch, std::exception from the standard library) into
// an Error with `code` whose message starts with `where` (allocation
// failures, std::bad_alloc or LibTorch's "not enough memory", become
// kResourceExhausted). Used at module boundaries so callers only ever catch
// tessera::Error.
template <typename Fn>
decltype(auto) translate_errors(const std::string& where, Fn&& fn,
                                ErrorCode code = ErrorCode::kInternal) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    detail::rethrow_as_error(e, where, code);
  }
}

}  // namespace tessera

// TESSERA_CHECK(cond, Kind, parts...) throws tessera::Kind with the parts
// streamed together when `cond` is false. Kind is one of the subclasses above.
//   TESSERA_CHECK(n > 0, InvalidArgument, "group size must be positive, got ", n);
#define TESSERA_CHECK(cond, Kind, ...)                                          \
  do {                                                                          \
    if (!(cond)) throw ::tessera::Kind(::tessera::detail::concat(__VA_ARGS__)); \
  } while (0)

#define TESSERA_THROW(Kind, ...) throw ::tessera::Kind(::tessera::detail::concat(__VA_ARGS__))
