#include "tessera/eval/filters.h"

#include <gtest/gtest.h>

#include "tessera/core/error.h"

namespace tessera::eval {
namespace {

struct Labelled {
  const char* response;
  const char* expected;  // "" = nothing extracted
};

// Hand-labelled model answers to A-D questions: what a careful human reader
// takes the chosen option to be.
const Labelled kLetterCases[] = {
    {"C", "C"},
    {"C.  行星嘅日會變得更短。", "C"},
    {"B. 建築會變得更安全", "B"},
    {"答案係 D", "D"},
    {"答案是C。", "C"},
    {"正確答案：(B)", "B"},
    {"我覺得答案應該係 A，因為佢最符合題意。", "A"},
    {"Answer: D", "D"},
    {"The answer is (C).", "C"},
    {"(B) 香港島", "B"},
    {"（D）一種傳染性嘅慢性病", "D"},
    {"【A】", "A"},
    {"選擇B", "B"},
    {"回應：C", "C"},
    {"Ｃ", "C"},                           // fullwidth letter
    {"答案：Ｂ", "B"},                     // fullwidth after a statement
    {"我揀C。", "C"},                      // lone letter after Han characters
    {"D\n\n解釋：選項A同B都唔啱。", "D"},  // leading letter beats later mentions
    {"B，因為(A)同(C)都唔啱", "B"},        // ... and later bracketed letters
    {"A同B都唔啱，應該揀（C）", "C"},      // a bracketed letter beats lone mentions
    {"唔係A，答案係B。", "B"},             // the explicit statement decides
    {"首先睇A選項，佢唔啱；最後答案：C", "C"},
    {"初步答案係 A，但再諗清楚，最終答案係 B。", "B"},  // the last statement wins
    {"細胞膜係區分原核細胞同真核細胞嘅關鍵。因此，正確答案是C。", "C"},
    {"ABCD 四個選項之中，我會揀 B 呢個", "B"},  // "ABCD" is a word, B stands alone
    {"我唔知道。", ""},
    {"Both options are wrong.", ""},  // no lone A-D letter
    {"", ""},
};

TEST(ChoiceLetter, HandLabelledResponses) {
  static_assert(sizeof(kLetterCases) / sizeof(kLetterCases[0]) >= 20, "at least 20 examples");
  for (const Labelled& c : kLetterCases) {
    const auto got = extract_choice_letter(c.response);
    EXPECT_EQ(got.value_or(""), c.expected) << "response: " << c.response;
  }
}

TEST(ChoiceLetter, CustomLetterSets) {
  EXPECT_EQ(extract_choice_letter("答案係 E", "ABCDE").value_or(""), "E");
  EXPECT_EQ(extract_choice_letter("答案係 E", "ABCD").value_or(""), "");
  EXPECT_THROW(extract_choice_letter("A", "abc"), InvalidArgument);
}

const Labelled kNumberCases[] = {
    {"Janet每日賣16-3-4=9隻鴨蛋。佢每日係農夫市場賺$9*2=18。####18", "18"},
    {"#### 70000", "70000"},
    {"總共係$1,450,000。####1,450,000", "1450000"},
    {"答案係 ####$ 64", "64"},
    {"####2.50", "2.5"},
    {"####18.0", "18"},
    {"####-3", "-3"},
    {"佢一個星期跑 3*60=180米。", "180"},  // no marker: last number
    {"共有20+80+160=260隻羊", "260"},
    {"佢要用 1.5 個鐘，即係 90 分鐘", "90"},
    {"#### 5 隻雞，之後再計 12", "5"},                // the marker beats later numbers
    {"答案：42\n問題：另一條題目有 7 個蘋果", "42"},  // ignore an invented next question
    {"答案：0.50", "0.5"},
    {"冇答案", ""},
};

TEST(Gsm8kNumber, HandLabelledResponses) {
  for (const Labelled& c : kNumberCases) {
    EXPECT_EQ(extract_gsm8k_number(c.response).value_or(""), c.expected) << c.response;
  }
}

TEST(Gsm8kNumber, CanonicalNumbers) {
  EXPECT_EQ(canonical_number("007").value_or("?"), "7");
  EXPECT_EQ(canonical_number("-0.000").value_or("?"), "0");
  EXPECT_EQ(canonical_number("12.").value_or("?"), "12");
  EXPECT_EQ(canonical_number("3.14159").value_or("?"), "3.14159");
  EXPECT_FALSE(canonical_number("1e5").has_value());
  EXPECT_FALSE(canonical_number("").has_value());
  EXPECT_FALSE(canonical_number("1,000").has_value());
}

FilterPipeline pipeline(std::vector<FilterSpec> filters) {
  return FilterPipeline::create({"p", std::move(filters)}, "test.yaml: filter_list[0]");
}

FilterSpec spec(const std::string& function) {
  FilterSpec f;
  f.function = function;
  return f;
}

FilterSpec regex(const std::string& pattern, int group_select = 0) {
  FilterSpec f = spec("regex");
  f.regex_pattern = pattern;
  f.group_select = group_select;
  return f;
}

TEST(FilterPipeline, RegexFollowsPythonFindall) {
  // One group: the group of the chosen match, stripped.
  EXPECT_EQ(pipeline({regex("#### (\\-?[0-9\\.\\,]+)")}).apply({"x #### 1,234 y #### 5"}), "1,234");
  EXPECT_EQ(pipeline({regex("#### (\\-?[0-9\\.\\,]+)", -1)}).apply({"x #### 1,234 y #### 5"}), "5");
  // No groups: the whole match.
  EXPECT_EQ(pipeline({regex("[0-9]+", 1)}).apply({"a1 b22 c333"}), "22");
  // Several groups (lm-eval's flexible-extract): the first non-empty one.
  EXPECT_EQ(pipeline({regex("(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}).apply({"is 7 or $12"}), "$12");
  EXPECT_EQ(pipeline({regex("(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}).apply({"is 12 or 7"}), "7");
  // Chinese literals and classes are matched per character.
  EXPECT_EQ(pipeline({regex("答案[：:]\\s*([A-D])")}).apply({"答案：C"}), "C");
  // No match, or group_select out of range: the fallback.
  EXPECT_EQ(pipeline({regex("#### (\\d+)")}).apply({"no marker"}), "[invalid]");
  EXPECT_EQ(pipeline({regex("(\\d)", 3)}).apply({"1 2"}), "[invalid]");
}

TEST(FilterPipeline, ChainsAndTakesTheFirstResponse) {
  EXPECT_EQ(pipeline({spec("remove_whitespace"), spec("take_first")}).apply({"  \n答案", "b"}),
            "答案");
  EXPECT_EQ(pipeline({spec("take_first"), spec("uppercase")}).apply({"abc", "zzz"}), "ABC");
  EXPECT_EQ(pipeline({spec("lowercase")}).apply({"AbC"}), "abc");
  EXPECT_EQ(pipeline({spec("choice_letter")}).apply({"答案係 B"}), "B");
  EXPECT_EQ(pipeline({spec("choice_letter")}).apply({"唔知"}), "[invalid]");
  EXPECT_EQ(pipeline({spec("gsm8k_number"), spec("take_first")}).apply({"…=12。####12"}), "12");
  // No filters: the first response unchanged.
  EXPECT_EQ(pipeline({}).apply({" raw "}), " raw ");
  EXPECT_THROW(pipeline({}).apply({}), InvalidArgument);
}

TEST(FilterPipeline, BadSpecsNameTheirPlace) {
  try {
    pipeline({spec("take_first"), regex("([A-D]")});
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("test.yaml: filter_list[0].filter[1].regex_pattern: invalid regex "
                               "'([A-D]'"),
              std::string::npos)
        << e.message();
  }
  try {
    pipeline({spec("shout")});
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("filter[0].function: unknown filter 'shout'"), std::string::npos)
        << e.message();
  }
  FilterSpec bad_letters = spec("choice_letter");
  bad_letters.letters = "ab";
  EXPECT_THROW(pipeline({bad_letters}), InvalidArgument);
}

}  // namespace
}  // namespace tessera::eval
