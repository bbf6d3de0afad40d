#include "tessera/core/error.h"

#include <new>

namespace tessera {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "INVALID_ARGUMENT";
    case ErrorCode::kNotFound:
      return "NOT_FOUND";
    case ErrorCode::kDataLoss:
      return "DATA_LOSS";
    case ErrorCode::kUnavailable:
      return "UNAVAILABLE";
    case ErrorCode::kDeadlineExceeded:
      return "DEADLINE_EXCEEDED";
    case ErrorCode::kFailedPrecondition:
      return "FAILED_PRECONDITION";
    case ErrorCode::kResourceExhausted:
      return "RESOURCE_EXHAUSTED";
    case ErrorCode::kAborted:
      return "ABORTED";
    case ErrorCode::kInternal:
      return "INTERNAL";
  }
  return "UNKNOWN";
}

Error::Error(ErrorCode code, std::string message)
    : code_(code),
      message_(std::move(message)),
      what_(std::string(error_code_name(code)) + ": " + message_) {}

void throw_error(ErrorCode code, std::string message) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      throw InvalidArgument(std::move(message));
    case ErrorCode::kNotFound:
      throw NotFound(std::move(message));
    case ErrorCode::kDataLoss:
      throw DataLoss(std::move(message));
    case ErrorCode::kUnavailable:
      throw Unavailable(std::move(message));
    case ErrorCode::kDeadlineExceeded:
      throw DeadlineExceeded(std::move(message));
    case ErrorCode::kFailedPrecondition:
      throw FailedPrecondition(std::move(message));
    case ErrorCode::kResourceExhausted:
      throw ResourceExhausted(std::move(message));
    case ErrorCode::kAborted:
      throw Aborted(std::move(message));
    case ErrorCode::kInternal:
      throw Internal(std::move(message));
  }
  throw Internal(std::move(message));
}

namespace detail {

void rethrow_as_error(const std::exception& e, const std::string& where, ErrorCode code) {
  // c10::Error's what() carries a C++ backtrace after the first line; keep
  // only the first line so messages stay readable.
  std::string text = e.what();
  const auto newline = text.find('\n');
  if (newline != std::string::npos) text.resize(newline);
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
      text.find("not enough memory") != std::string::npos ||
      text.find("out of memory") != std::string::npos) {
    code = ErrorCode::kResourceExhausted;
  }
  throw_error(code, where + ": " + text);
}

}  // namespace detail
}  // namespace tessera
