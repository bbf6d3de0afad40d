// The torch-free parts of synth: MinHash deduplication against exact
// Jaccard, the math verifier against independent evaluation, the failure
// labellers, and JSONL files across interrupted writes.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>

#include "tessera/core/error.h"
#include "tessera/synth/jsonl.h"
#include "tessera/synth/labeller.h"
#include "tessera/synth/math.h"
#include "tessera/synth/minhash.h"
#include "test_main.h"

namespace tessera::synth {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------- MinHash

TEST(Shingles, WordsNumbersAndSymbols) {
  EXPECT_EQ(shingle_words("What is 23+5?"),
            (std::vector<std::string>{"what", "is", "23", "+", "5", "?"}));
  EXPECT_EQ(shingles("a b c", {.shingle_words = 2}).size(), 2u);
  EXPECT_EQ(shingles("a", {.shingle_words = 2}).size(), 1u);  // shorter than n: one shingle
  EXPECT_TRUE(shingles("   ", {}).empty());
  // Word boundaries matter: ("ab", "c") differs from ("a", "bc").
  EXPECT_NE(shingles("ab c", {.shingle_words = 2}), shingles("a bc", {.shingle_words = 2}));
  EXPECT_EQ(shingles("What IS  this", {}), shingles("what is this", {}));
}

TEST(Jaccard, ExactOnSortedSets) {
  EXPECT_DOUBLE_EQ(jaccard({1, 2, 3}, {2, 3, 4}), 0.5);
  EXPECT_DOUBLE_EQ(jaccard({}, {}), 1.0);
  EXPECT_DOUBLE_EQ(jaccard({1}, {}), 0.0);
}

// Random texts over a small vocabulary: a base text and variants that
// replace a share of its words, giving Jaccard values across [0, 1].
std::vector<std::string> texts_with_variants(int64_t bases, int64_t variants, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> out;
  for (int64_t b = 0; b < bases; ++b) {
    std::vector<std::string> words;
    for (int i = 0; i < 20; ++i) words.push_back("w" + std::to_string(rng() % 400));
    auto join = [](const std::vector<std::string>& w) {
      std::string s;
      for (const auto& x : w) s += x + " ";
      return s;
    };
    out.push_back(join(words));
    for (int64_t v = 0; v < variants; ++v) {
      auto copy = words;
      const int changes = static_cast<int>(rng() % 12);
      for (int c = 0; c < changes; ++c)
        copy[rng() % copy.size()] = "v" + std::to_string(rng() % 400);
      out.push_back(join(copy));
    }
  }
  std::shuffle(out.begin(), out.end(), rng);
  return out;
}

TEST(MinHash, EstimatesTrackExactJaccardOnASample) {
  MinHashOptions o;
  MinHasher hasher(o);
  auto texts = texts_with_variants(20, 4, 3);
  double total_error = 0;
  int pairs = 0, outside = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    for (size_t j = i + 1; j < texts.size(); j += 3) {
      const auto a = shingles(texts[i], o), b = shingles(texts[j], o);
      const double exact = jaccard(a, b);
      const double est = MinHasher::estimate(hasher.signature(a), hasher.signature(b));
      const double sd = std::sqrt(std::max(exact * (1 - exact), 1e-3) / o.num_permutations);
      outside += std::abs(est - exact) > 4 * sd + 0.02;
      total_error += std::abs(est - exact);
      ++pairs;
    }
  }
  EXPECT_GT(pairs, 500);
  EXPECT_LT(total_error / pairs, 0.03);
  EXPECT_LE(outside, pairs / 200);  // 4 standard deviations: almost never
}

// Greedy deduplication against the same greedy pass with exact Jaccard
// over every earlier kept text (no hashing at all).
TEST(MinHash, DeduplicationAgreesWithExactPairwiseJaccard) {
  MinHashOptions o;
  auto texts = texts_with_variants(40, 3, 7);
  DedupResult got = deduplicate(texts, o);
  std::vector<std::vector<uint64_t>> kept_sets;
  std::vector<int64_t> want_kept;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto s = shingles(texts[i], o);
    bool dup = false;
    for (const auto& k : kept_sets) dup = dup || jaccard(s, k) >= o.threshold;
    if (!dup) {
      kept_sets.push_back(s);
      want_kept.push_back(static_cast<int64_t>(i));
    }
  }
  const int64_t want_dups = static_cast<int64_t>(texts.size() - want_kept.size());
  EXPECT_GT(want_dups, 20);  // the sample has near duplicates to find
  // Every duplicate it reports is one (exact check), and it finds nearly all.
  for (size_t i = 0; i < texts.size(); ++i) {
    if (got.duplicate_of[i] >= 0) {
      EXPECT_GE(jaccard(shingles(texts[i], o), shingles(texts[got.duplicate_of[i]], o)),
                o.threshold);
    }
  }
  std::set<int64_t> a(got.kept.begin(), got.kept.end()), b(want_kept.begin(), want_kept.end());
  int64_t disagree = 0;
  for (size_t i = 0; i < texts.size(); ++i) disagree += a.count(i) != b.count(i);
  EXPECT_LE(disagree, 1) << "LSH missed candidates";
  EXPECT_NEAR(got.duplicate_rate, static_cast<double>(want_dups) / texts.size(),
              1.0 / texts.size() + 1e-12);
}

TEST(MinHash, ReferenceTextsRemoveCopiesButAreNotOutput) {
  auto r =
      deduplicate({"What is 3 + 4?", "what is 3 + 4 ?", "Compute 9 * 9."}, {}, {"Compute 9 * 9."});
  EXPECT_EQ(r.kept, (std::vector<int64_t>{0}));
  EXPECT_EQ(r.duplicate_of, (std::vector<int64_t>{-1, 0, -2}));
  // Different numbers are different problems.
  auto d = deduplicate({"What is 23 + 58?", "What is 23 + 59?"});
  EXPECT_EQ(d.kept.size(), 2u);
  EXPECT_THROW(MinHasher({.num_permutations = 100, .bands = 32}), InvalidArgument);
  EXPECT_THROW(MinHasher({.threshold = 0.0}), InvalidArgument);
}

TEST(Diversity, DistinctN) {
  EXPECT_DOUBLE_EQ(distinct_n({"a b a b"}, 1), 0.5);
  EXPECT_DOUBLE_EQ(distinct_n({"a b", "a b"}, 2), 0.5);
  EXPECT_DOUBLE_EQ(distinct_n({"a"}, 2), 0.0);
}

// ------------------------------------------------------------- Math

TEST(MathVerifier, FindsAndEvaluatesTheStatedExpression) {
  struct Case {
    const char* text;
    const char* value;
    const char* expression;
  };
  for (const Case& c :
       std::vector<Case>{{"What is 23 + 58 * 2?", "139", "23 + 58 * 2"},
                         {"Compute 7 * (12 - 5).", "49", "7 * (12 - 5)"},
                         {"Calculate 120 divided by 8 minus 3.", "12", "120 / 8 - 3"},
                         {"What is 6 times 7?", "42", "6 * 7"},
                         {"Evaluate -5 + 3.", "-2", "-5 + 3"},
                         {"What is 1,250 + 2,000?", "3250", "1250 + 2000"},
                         {"4. What is 9 x 3?", "27", "9 * 3"},
                         {"What is 2.5 * 4?", "10", "2.5 * 4"},
                         {"What is 23 + 58 = ?", "81", "23 + 58"},
                         {"Find the value of 100 - (3 \xC3\x97 4).", "88", "100 - (3 * 4)"}}) {
    SCOPED_TRACE(c.text);
    MathProblem p = parse_math_problem(c.text);
    ASSERT_TRUE(p.valid) << p.reason;
    EXPECT_EQ(p.value.to_string(), c.value);
  }
}

TEST(MathVerifier, RefusesWhatItCannotVouchFor) {
  for (const char* text :
       {"What is the capital of France?", "What is 3 + 4? Then add 5 + 6.", "Solve x = 3 + 4.",
        "What is 2^3 + 1?", "What is 20% of 50 + 5?", "Double 3 + 4.",
        "Tom has 5 apples and 3 pears.", "What is 7 / 0 + 1?", "What is 7 / 2?", "What is 3 + * 4?",
        "What is 1234567 + 1?", "What is 1 + 2 + 3 + 4 + 5 + 6 + 7?", "What is 5 + 3 = 9?",
        "Add 3 + 4 to 10."}) {
    SCOPED_TRACE(text);
    MathProblem p = parse_math_problem(text);
    EXPECT_FALSE(p.valid) << p.expression << " = " << p.value.to_string();
    EXPECT_FALSE(p.reason.empty());
  }
  EXPECT_TRUE(parse_math_problem("What is 7 / 2?", {.integer_answers_only = false}).valid);
}

// Random expressions evaluated two ways: the parser, and a direct
// evaluation of the same operations in exact integer arithmetic.
TEST(MathVerifier, EvaluationMatchesADirectComputationOnRandomExpressions) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 500; ++trial) {
    // a op1 (b op2 c) op3 d with + - * and exact division by a divisor of the
    // parenthesised value.
    const int64_t a = rng() % 50 + 1, b = rng() % 50 + 1, c = rng() % 50 + 1, d = rng() % 9 + 1;
    const char ops[] = {'+', '-', '*'};
    const char o1 = ops[rng() % 3], o2 = ops[rng() % 3];
    int64_t inner = o2 == '+' ? b + c : o2 == '-' ? b - c : b * c;
    // op3 is '*' so precedence matters: a o1 (inner * d).
    int64_t tail = inner * d;
    int64_t want = o1 == '+' ? a + tail : o1 == '-' ? a - tail : a * tail;
    std::string text = std::to_string(a) + " " + o1 + " (" + std::to_string(b) + " " + o2 + " " +
                       std::to_string(c) + ") * " + std::to_string(d);
    Rational got = evaluate_expression(text);
    EXPECT_TRUE(got.is_integer()) << text;
    EXPECT_EQ(got.num, want) << text;
  }
  EXPECT_EQ(evaluate_expression("2 - 3 - 4").num, -5);  // left associative
  EXPECT_EQ(evaluate_expression("24 / 4 / 2").num, 3);
  EXPECT_EQ(evaluate_expression("-(3 + 4) * 2").num, -14);
  EXPECT_EQ(evaluate_expression("1 / 3").to_string(), "1/3");
  EXPECT_EQ(evaluate_expression("7 / 4").to_string(), "1.75");
  EXPECT_THROW(evaluate_expression("(1 + 2"), InvalidArgument);
  EXPECT_THROW(evaluate_expression("4 / (2 - 2)"), InvalidArgument);
  EXPECT_THROW(evaluate_expression("99999999999 * 99999999999"), InvalidArgument);
}

TEST(MathVerifier, ReadsTheLastNumberOfAnAnswer) {
  EXPECT_EQ(extract_answer("23 + 58 = 81")->to_string(), "81");
  EXPECT_EQ(extract_answer("The answer is -7.")->to_string(), "-7");
  EXPECT_EQ(extract_answer("10-3=7")->to_string(), "7");
  EXPECT_EQ(extract_answer("So 10-3")->to_string(), "3");  // binary minus, not a sign
  EXPECT_EQ(extract_answer("It is 1,250.")->to_string(), "1250");
  EXPECT_EQ(extract_answer("About 3.50 then")->to_string(), "3.5");
  EXPECT_EQ(extract_answer("Half: 7/2")->to_string(), "3.5");
  EXPECT_FALSE(extract_answer("I do not know.").has_value());
  EXPECT_TRUE(answers_match({81, 1}, "81.0"));
  EXPECT_FALSE(answers_match({81, 1}, "80"));
}

TEST(MathVerifier, WorkedSolutionEndsWithTheVerifiedAnswer) {
  MathProblem p = parse_math_problem("Compute 7 * (12 - 5) - 9.");
  ASSERT_TRUE(p.valid);
  EXPECT_EQ(worked_solution(p), "12 - 5 = 7\n7 * 7 = 49\n49 - 9 = 40\nThe answer is 40.");
  EXPECT_TRUE(answers_match(p.value, worked_solution(p)));
  EXPECT_THROW(worked_solution(parse_math_problem("hello")), InvalidArgument);
}

TEST(MathVerifier, GeneratedProblemsAreValidDistinctAndSeeded) {
  auto a = arithmetic_problems(300, 1);
  EXPECT_EQ(a.size(), 300u);
  EXPECT_EQ(std::set<std::string>(a.begin(), a.end()).size(), 300u);
  for (const auto& t : a) EXPECT_TRUE(parse_math_problem(t).valid) << t;
  EXPECT_EQ(arithmetic_problems(300, 1), a);
  EXPECT_NE(arithmetic_problems(300, 2), a);
  // Every shape the options allow is generated: two and three operands,
  // symbols and words, with and without parentheses.
  auto count = [&](const std::function<bool(const std::string&)>& f) {
    return std::count_if(a.begin(), a.end(), f);
  };
  auto operators = [](const std::string& t) {
    int64_t n = 0;
    for (const char* op : {" + ", " - ", " * ", " / ", " plus ", " minus ", " times ", " divided "})
      for (size_t at = t.find(op); at != std::string::npos; at = t.find(op, at + 1)) ++n;
    return n;
  };
  EXPECT_GT(count([&](const std::string& t) { return operators(t) == 1; }), 50);
  EXPECT_GT(count([&](const std::string& t) { return operators(t) == 2; }), 50);
  EXPECT_GT(count([](const std::string& t) {
              return t.find(" plus ") != std::string::npos ||
                     t.find(" minus ") != std::string::npos ||
                     t.find(" times ") != std::string::npos;
            }),
            20);
  EXPECT_GT(count([](const std::string& t) { return t.find('(') != std::string::npos; }), 20);
  EXPECT_GT(count([&](const std::string& t) {
              return operators(t) == 2 && t.find('(') == std::string::npos;
            }),
            20);
  ProblemGeneratorOptions easy;
  easy.max_operands = 2;
  easy.max_value = 20;
  easy.division = false;
  easy.parentheses = false;
  for (const auto& t : arithmetic_problems(200, 3, easy)) {
    EXPECT_EQ(operators(t), 1) << t;
    EXPECT_EQ(t.find_first_of("()/"), std::string::npos) << t;
    EXPECT_EQ(t.find("divided"), std::string::npos) << t;
  }
}

// ------------------------------------------------------------- Labellers

TEST(MathLabeller, JudgesTheGreedyAnswer) {
  MathLabeller m;
  EXPECT_EQ(m.query().samples, 0);
  EXPECT_TRUE(m.query().greedy);
  auto pre = m.precheck("What is 12 * 12?");
  EXPECT_TRUE(pre.valid);
  EXPECT_EQ(pre.reference, "144");
  EXPECT_FALSE(m.precheck("Why?").valid);
  auto greedy = [](std::string text) {
    TargetResponses r;
    r.greedy = std::move(text);
    return r;
  };
  auto wrong = m.label("What is 12 * 12?", greedy("12 * 12 = 124"));
  EXPECT_TRUE(wrong.failure);
  EXPECT_EQ(wrong.answer, "124");
  EXPECT_FALSE(m.label("What is 12 * 12?", greedy("It is 144.")).failure);
  EXPECT_TRUE(m.label("What is 12 * 12?", greedy("A lot.")).failure);
  EXPECT_EQ(m.good_response("What is 12 * 12?"), "12 * 12 = 144\nThe answer is 144.");
}

TEST(EntropyLabeller, EntropyOfTheAnswersAgainstTheThreshold) {
  // Direct: -sum p log p.
  std::vector<std::string> keys = {"a", "a", "a", "b", "b", "c", "a", "a", "b", "d"};
  const double want = -(0.5 * std::log(0.5) + 0.3 * std::log(0.3) + 0.1 * std::log(0.1) * 2);
  EXPECT_NEAR(answer_entropy(keys), want, 1e-12);
  EXPECT_DOUBLE_EQ(answer_entropy({"x", "x"}), 0.0);
  EXPECT_THROW(answer_entropy({}), InvalidArgument);
  EXPECT_EQ(default_answer_key("The year was 1,969."), "1969");
  EXPECT_EQ(default_answer_key("  Paris!\nIt is big"), "paris");

  EntropyLabeller e;  // 10 samples, threshold 0.5 nats
  EXPECT_EQ(e.query().samples, 10);
  EXPECT_FALSE(e.query().greedy);
  TargetResponses steady, split;
  for (int i = 0; i < 10; ++i) steady.samples.push_back(i < 9 ? "Paris." : "Lyon.");  // 0.33 nats
  for (int i = 0; i < 10; ++i) split.samples.push_back(i < 6 ? "1815" : i < 9 ? "1814" : "1812");
  auto a = e.label("q", steady);
  EXPECT_FALSE(a.failure);
  EXPECT_EQ(a.answer, "paris");
  auto b = e.label("q", split);
  EXPECT_TRUE(b.failure);
  EXPECT_NEAR(b.score, -(0.6 * std::log(0.6) + 0.3 * std::log(0.3) + 0.1 * std::log(0.1)), 1e-12);
  TargetResponses one;
  one.samples = {"a"};
  EXPECT_FALSE(e.label("q", one).valid);
  EXPECT_THROW(EntropyLabeller({.samples = 1}), InvalidArgument);
}

// ------------------------------------------------------------- JSONL

std::string scratch(const std::string& name) {
  fs::path p = fs::path(::testing::TempDir()) / ("synth_" + std::to_string(getpid())) / name;
  fs::remove_all(p);
  return p.string();
}

TEST(Jsonl, AppendsAndReadsBack) {
  const std::string path = scratch("a") + "/log.jsonl";
  {
    auto log = JsonlLog::open(path);
    EXPECT_EQ(log.size(), 0);
    log.append(std::vector<std::string>{R"({"id":1})", R"({"id":2})"});
    log.append(R"({"id":3,"text":"a\nb"})");  // escaped newline inside a string is fine
    EXPECT_THROW(log.append("[1, 2]"), InvalidArgument);
    EXPECT_THROW(log.append("{\"a\":\n1}"), InvalidArgument);
  }
  auto again = JsonlLog::open(path);
  ASSERT_EQ(again.size(), 3);
  EXPECT_EQ(again.records()[2], R"({"id":3,"text":"a\nb"})");
}

TEST(Jsonl, AnInterruptedLastLineIsDroppedAndCorruptionIsReported) {
  const std::string path = scratch("b") + "/log.jsonl";
  {
    auto log = JsonlLog::open(path);
    log.append(std::vector<std::string>{R"({"id":1})", R"({"id":2})"});
  }
  {
    std::ofstream out(path, std::ios::app);
    out << R"({"id":3,"te)";  // a write cut short by a crash
  }
  {
    auto log = JsonlLog::open(path);
    EXPECT_EQ(log.size(), 2);
    log.append(R"({"id":3})");
  }
  EXPECT_EQ(JsonlLog::open(path).size(), 3);
  {
    std::ofstream out(path, std::ios::app);
    out << "not json\n"
        << R"({"id":4})"
        << "\n";
  }
  try {
    JsonlLog::open(path);
    FAIL() << "corruption was not reported";
  } catch (const DataLoss& e) {
    EXPECT_NE(std::string(e.what()).find("log.jsonl:4"), std::string::npos) << e.what();
  }
}

TEST(Jsonl, AtomicFiles) {
  const std::string path = scratch("c") + "/deep/summary.json";
  EXPECT_FALSE(read_file_if_exists(path).has_value());
  write_file_atomic(path, "{}\n");
  EXPECT_EQ(*read_file_if_exists(path), "{}\n");
}

}  // namespace
}  // namespace tessera::synth
