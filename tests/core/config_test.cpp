#include "tessera/core/config.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include "tessera/core/error.h"

namespace tessera {
namespace {

TEST(Config, TypedGettersAndDefaults) {
  auto cfg = ConfigObject::parse(
      R"({"lr": 0.001, "steps": 100, "name": "run", "tp": [1, 2], "bf16": true,
          "model": {"layers": 4}})",
      "train.json");
  EXPECT_DOUBLE_EQ(cfg.get_double("lr"), 0.001);
  EXPECT_EQ(cfg.get_int("steps"), 100);
  EXPECT_EQ(cfg.get_string("name"), "run");
  EXPECT_EQ(cfg.get_int_list("tp"), (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE(cfg.get_bool("bf16"));
  EXPECT_EQ(cfg.get_object("model").get_int("layers"), 4);
  EXPECT_EQ(cfg.get_int("warmup", 7), 7);
  EXPECT_NO_THROW(cfg.check_no_unknown_keys());
}

TEST(Config, UnknownKeyIsNamed) {
  auto cfg = ConfigObject::parse(R"({"lr": 1, "lr_warmpu": 5})", "train.json");
  cfg.get_double("lr");
  try {
    cfg.check_no_unknown_keys();
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("train.json"), std::string::npos) << e.message();
    EXPECT_NE(e.message().find("'lr_warmpu'"), std::string::npos) << e.message();
  }
}

TEST(Config, UnknownNestedKeyHasItsPath) {
  auto cfg = ConfigObject::parse(R"({"model": {"layers": 2, "hiden": 8}})", "m.json");
  cfg.get_object("model").get_int("layers");
  try {
    cfg.check_no_unknown_keys();
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("'model.hiden'"), std::string::npos) << e.message();
  }
}

TEST(Config, MalformedJsonGivesLineAndColumn) {
  try {
    ConfigObject::parse("{\n  \"a\": 1,\n  \"b\": ]\n}", "bad.json");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("bad.json: malformed JSON at line 3, column 8"), std::string::npos)
        << e.message();
  }
}

TEST(Config, WrongTypeAndMissingKey) {
  auto cfg = ConfigObject::parse(R"({"steps": "ten"})", "c.json");
  try {
    cfg.get_int("steps");
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("key 'steps' must be an integer, got string"), std::string::npos)
        << e.message();
  }
  EXPECT_THROW(cfg.get_double("lr"), InvalidArgument);
  EXPECT_THROW(ConfigObject::parse("[1, 2]"), InvalidArgument);
}

TEST(Config, LoadFileAndMissingFile) {
  std::string path = ::testing::TempDir() + "/tessera_config_test.json";
  {
    std::ofstream out(path);
    out << R"({"x": 3})";
  }
  EXPECT_EQ(ConfigObject::load_file(path).get_int("x"), 3);
  std::remove(path.c_str());
  EXPECT_THROW(ConfigObject::load_file(path), NotFound);
}

// Regression (the bug fuzz/sim_cluster_fuzz.cpp found in sim's JSON reader,
// present here too): a number too large for a double made nlohmann throw
// out_of_range.406, which escaped parse() instead of InvalidArgument.
TEST(Config, FuzzNumberTooLargeForADoubleIsInvalidArgument) {
  try {
    ConfigObject::parse(R"({"lr": 1e999})", "run.json");
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("run.json: malformed JSON"), std::string::npos) << e.message();
  }
  EXPECT_THROW(ConfigObject::parse("[-123456789012345678901234567890e400]"), InvalidArgument);
}

}  // namespace
}  // namespace tessera
