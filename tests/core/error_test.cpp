#include "tessera/core/error.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

namespace tessera {
namespace {

TEST(Error, CodeAndMessage) {
  try {
    TESSERA_THROW(NotFound, "tensor '", "w", "' missing from ", 3, " shards");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_EQ(e.message(), "tensor 'w' missing from 3 shards");
    EXPECT_STREQ(e.what(), "NOT_FOUND: tensor 'w' missing from 3 shards");
  }
}

TEST(Error, CheckThrowsOnlyWhenFalse) {
  EXPECT_NO_THROW(TESSERA_CHECK(1 + 1 == 2, InvalidArgument, "never"));
  EXPECT_THROW(TESSERA_CHECK(false, DataLoss, "bad"), DataLoss);
}

TEST(Error, ThrowErrorPicksSubclass) {
  EXPECT_THROW(throw_error(ErrorCode::kDeadlineExceeded, "x"), DeadlineExceeded);
  EXPECT_THROW(throw_error(ErrorCode::kUnavailable, "x"), Unavailable);
  EXPECT_THROW(throw_error(ErrorCode::kResourceExhausted, "x"), ResourceExhausted);
}

TEST(Error, TranslatesTorchErrorsAtBoundary) {
  // A shape mismatch inside LibTorch becomes a tessera::Error whose message
  // starts with the boundary's description and keeps only c10's first line.
  try {
    translate_errors(
        "adding tensors",
        [] {
          return at::ones({2, 3}) + at::ones({4});
        },
        ErrorCode::kInvalidArgument);
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_EQ(e.message().rfind("adding tensors: ", 0), 0u) << e.message();
    EXPECT_EQ(e.message().find('\n'), std::string::npos);
  }
}

TEST(Error, TranslatePassesTesseraErrorsThrough) {
  EXPECT_THROW(translate_errors("outer", [] { TESSERA_THROW(DataLoss, "inner"); }), DataLoss);
}

}  // namespace
}  // namespace tessera
