#include "tessera/eval/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "eval_test_util.h"
#include "tessera/core/error.h"
#include "tessera/eval/segmenter.h"

namespace tessera::eval {
namespace {

using json = nlohmann::json;

Tokens toks(const std::string& s) { return split_whitespace(s); }

TEST(Tokenize, PythonSplitSemantics) {
  EXPECT_EQ(split_whitespace("  a\tb\n c\u3000d\u00a0e  "), (Tokens{"a", "b", "c", "d", "e"}));
  EXPECT_EQ(split_whitespace(""), Tokens{});
  EXPECT_EQ(tokenize_13a("Hello, world! It's 3.5-4 (approx.)"),
            "Hello , world ! It's 3.5 - 4 ( approx . )");
  EXPECT_EQ(tokenize_13a("&quot;a&quot; &amp; b-\nc"), "\" a \" & bc");
  EXPECT_EQ(rouge_tokenize("The U.S. cost $5,000 — 中文 ok"),
            (Tokens{"the", "u", "s", "cost", "5", "000", "ok"}));
}

TEST(Bleu, HandComputedExample) {
  // 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3 -> 'exp' smoothing
  // gives the zero count 100 / (2 * 3); equal lengths -> no brevity penalty.
  const auto s = corpus_bleu({toks("the cat sat on the mat")}, {{toks("the cat is on the mat")}});
  const double expected = std::pow(100.0 * 5 / 6 * 100.0 * 3 / 5 * 100.0 / 4 * 100.0 / 6, 0.25);
  EXPECT_NEAR(s.score, expected, 1e-9);
  EXPECT_NEAR(s.precisions[0], 100.0 * 5 / 6, 1e-12);
  EXPECT_NEAR(s.precisions[3], 100.0 / 6, 1e-12);
  EXPECT_DOUBLE_EQ(s.brevity_penalty, 1.0);

  // With no smoothing the zero 4-gram precision makes BLEU 0.
  BleuOptions none;
  none.smoothing = BleuSmoothing::kNone;
  EXPECT_LT(
      corpus_bleu({toks("the cat sat on the mat")}, {{toks("the cat is on the mat")}}, none).score,
      1e-100);
  // A short hypothesis pays the brevity penalty exp(1 - r / c).
  const auto short_hyp = corpus_bleu({toks("a b c d")}, {{toks("a b c d e f g h")}});
  EXPECT_NEAR(short_hyp.brevity_penalty, std::exp(1.0 - 8.0 / 4.0), 1e-12);
  EXPECT_NEAR(short_hyp.score, 100.0 * std::exp(1.0 - 2.0), 1e-9);
  // Nothing matches: 0 whatever the smoothing.
  EXPECT_EQ(corpus_bleu({toks("x y z w")}, {{toks("a b c d")}}).score, 0.0);
}

TEST(Bleu, ClippingAndClosestReference) {
  // "the the the" against "the cat": one "the" can match.
  const BleuStats st = bleu_stats(toks("the the the"), {toks("the cat")});
  EXPECT_EQ(st.correct[0], 1);
  EXPECT_EQ(st.total[0], 3);
  // References of length 2 and 4 for a hypothesis of length 3: both are 1
  // away, the shorter one is used.
  EXPECT_EQ(bleu_stats(toks("a b c"), {toks("a b c d"), toks("a b")}).ref_len, 2);
  EXPECT_THROW(corpus_bleu({toks("a")}, {{toks("a"), toks("b")}}), InvalidArgument);
}

TEST(RougeL, HandComputedExample) {
  // LCS("a b c d e", "a c e f") = "a c e": P = 3/4, R = 3/5.
  const RougeScore s = rouge_l(toks("a b c d e"), toks("a c e f"));
  EXPECT_DOUBLE_EQ(s.precision, 0.75);
  EXPECT_DOUBLE_EQ(s.recall, 0.6);
  EXPECT_NEAR(s.fmeasure, 2 * 0.75 * 0.6 / 1.35, 1e-15);
  EXPECT_EQ(rouge_l({}, toks("a")).fmeasure, 0.0);
  EXPECT_EQ(rouge_l(toks("a b"), toks("c d")).fmeasure, 0.0);
}

TEST(ExactMatch, LmEvalOptions) {
  EXPECT_EQ(ExactMatcher::create({}).score("Paris", "paris"), 0.0);
  ExactMatchOptions o;
  o.ignore_case = true;
  o.ignore_punctuation = true;
  EXPECT_EQ(ExactMatcher::create(o).score("Paris!", "paris"), 1.0);
  ExactMatchOptions gsm;
  gsm.regexes_to_ignore = {",", "\\$", "[\\s\\S]*####\\s*", "\\.$"};
  const auto m = ExactMatcher::create(gsm);
  EXPECT_EQ(m.normalize("要3條布料。\n####3,000."), "3000");
  EXPECT_EQ(m.score("3000", "要3條布料。####3,000"), 1.0);
  EXPECT_EQ(m.score("300", "####3,000"), 0.0);
  ExactMatchOptions digits;
  digits.ignore_numbers = true;
  EXPECT_EQ(ExactMatcher::create(digits).score("第1題", "第2題"), 1.0);
  ExactMatchOptions bad;
  bad.regexes_to_ignore = {"(unclosed"};
  try {
    ExactMatcher::create(bad, "t.yaml: metric_list[0]");
    FAIL() << "no throw";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(e.message().find("t.yaml: metric_list[0].regexes_to_ignore[0]: invalid regex"),
              std::string::npos)
        << e.message();
  }
}

TEST(Stderr, MeanStderrMatchesTheFormula) {
  const std::vector<double> xs = {1, 0, 1, 1, 0, 1, 1, 1};
  const double mu = 6.0 / 8;
  double ss = 0;
  for (double x : xs) ss += (x - mu) * (x - mu);
  EXPECT_NEAR(mean_stderr(xs), std::sqrt(ss / 7) / std::sqrt(8.0), 1e-15);
  EXPECT_EQ(mean_stderr({1.0}), 0.0);
}

TEST(Stderr, BootstrapOfTheMeanApproximatesTheAnalyticValue) {
  // 0/1 values with p = 0.3: the bootstrap estimate of the mean's standard
  // error is close to sqrt(p (1 - p) / n).
  std::vector<double> xs(500);
  for (size_t i = 0; i < xs.size(); ++i) xs[i] = (i * 7919) % 10 < 3 ? 1.0 : 0.0;
  auto mean_of = [&](const std::vector<size_t>& idx) {
    double s = 0;
    for (size_t k : idx) s += xs[k];
    return s / static_cast<double>(idx.size());
  };
  const double se = bootstrap_stderr(mean_of, xs.size(), {4000});
  EXPECT_NEAR(se, std::sqrt(0.3 * 0.7 / 500), 0.002);
  // Fixed seeds: the same replicates every time.
  EXPECT_EQ(se, bootstrap_stderr(mean_of, xs.size(), {4000}));
  // Only whole chunks of min(1000, iters) resamples count (1500 -> 1000).
  EXPECT_EQ(bootstrap_stderr(mean_of, xs.size(), {1500}),
            bootstrap_stderr(mean_of, xs.size(), {1000}));
  EXPECT_THROW(bootstrap_stderr(mean_of, 0, {100}), InvalidArgument);
}

// ---------------------------------------------------------------------------
// Cross-checks against the reference Python packages.

// Deterministic edits of a token sequence that exercise BLEU's branches:
// identical, dropped tokens (brevity penalty), swapped pairs, an unrelated
// sentence, a very short prefix (no 3/4-grams), a padded repeat (clipping).
Tokens perturb(const Tokens& t, const Tokens& other, size_t k) {
  Tokens out;
  switch (k % 6) {
    case 0:
      return t;
    case 1:
      for (size_t i = 0; i < t.size(); ++i) {
        if (i % 3 != 2) out.push_back(t[i]);
      }
      return out;
    case 2:
      out = t;
      for (size_t i = 0; i + 1 < out.size(); i += 2) std::swap(out[i], out[i + 1]);
      return out;
    case 3:
      return other;
    case 4:
      return Tokens(t.begin(), t.begin() + std::min<size_t>(t.size(), 1 + k % 3));
    default:
      out = t;
      out.insert(out.end(), t.begin(), t.begin() + t.size() / 2);
      return out;
  }
}

std::string join(const Tokens& t) {
  std::string s;
  for (size_t i = 0; i < t.size(); ++i) s += (i ? " " : "") + t[i];
  return s;
}

std::vector<std::string> cantonese_sentences() {
  std::vector<std::string> out = {
      "我哋今日去咗旅行，好開心。",
      "從前有一隻狗叫 Spot ，佢成日都戴住條紅色頸圈。",
      "幸運餅乾嘅起源唔太清楚",
      "西瓜核會經過你嘅消化系統",
      "由於啲爆炸聲太恐怖，畀子彈打中太痛，動物都抵擋唔住。",
      "你老公有冇平機票啊？平機票要淡季先有得平㗎喎。",
      "佢一個星期跑三次，所以佢跑3*60=180米。",
      "血管係藍色因為藍光唔係好深入人體組織",
  };
  if (testing::have_yue_data()) {
    const auto trans = json::parse(
        testing::read_file(testing::yue_data_root() + "/Yue-TRANS/Yue-TRANS-zh-yue.json"));
    for (size_t i = 0; i < 40; ++i) out.push_back(trans[i]["yue"].get<std::string>());
    const auto tqa = json::parse(
        testing::read_file(testing::yue_data_root() + "/Yue-TruthfulQA/Yue-TruthfulQA.json"));
    for (size_t i = 0; i < 40; ++i) out.push_back(tqa[i * 7]["best_answer"].get<std::string>());
  }
  return out;
}

std::vector<std::string> english_sentences() {
  std::vector<std::string> out = {
      "Hello, world! It's 3.5-4.0 (approx.) & more...",
      "The U.S.A. spent $1,000,000.50 on 12-3 projects; see p. 4.",
      "tabs\tand new-\nlines with -- dashes and a/b or {c} [d] <e> `f` ~g~ ^h^ |i|",
      "&quot;quoted&quot; &amp; &lt;tag&gt; <skipped> x",
      "Once upon a time, there was a dog named Spot.",
      "Spot barked and chased after the bird. But then, he got too close.",
      "中文，混合 English words.",
      "a.b,c 1.2,3 x.5 7,y",
  };
  if (testing::have_yue_data()) {
    const auto trans = json::parse(
        testing::read_file(testing::yue_data_root() + "/Yue-TRANS/Yue-TRANS-en-yue.json"));
    for (size_t i = 0; i < 40; ++i) out.push_back(trans[i]["en"].get<std::string>());
  }
  return out;
}

constexpr const char* kCheckScript = R"PY(
import json, sys
import sacrebleu
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from rouge_score import rouge_scorer

data = json.load(open(sys.argv[1], encoding="utf-8"))
SMOOTHING = [("exp", None), ("floor", None), ("floor", 0.2), ("add-k", None), ("add-k", 0.5), ("none", None)]

def bleu_suite(pairs, tokenize):
    hyps = [h for h, _ in pairs]
    refs = [r for _, r in pairs]
    corpus = [sacrebleu.corpus_bleu(hyps, [refs], smooth_method=m, smooth_value=v, tokenize=tokenize).score
              for m, v in SMOOTHING]
    sentence = [[sacrebleu.corpus_bleu([h], [[r]], smooth_method=m, smooth_value=v, tokenize=tokenize).score
                 for m, v in SMOOTHING] for h, r in pairs]
    effective = [BLEU(tokenize=tokenize, effective_order=True).sentence_score(h, [r]).score for h, r in pairs]
    return corpus, sentence, effective

class Whitespace:
    def tokenize(self, text):
        return text.split()

out = {}
out["yue_corpus"], out["yue_sentence"], out["yue_effective"] = bleu_suite(data["yue"], "none")
out["en_corpus"], out["en_sentence"], out["en_effective"] = bleu_suite(data["en"], "13a")
multi = data["multi"]
out["multi"] = sacrebleu.corpus_bleu(multi["hyps"], multi["refs"], tokenize="none").score
ws = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
out["yue_rouge"] = [list(ws.score(r, h)["rougeL"]) for h, r in data["yue"]]
default = rouge_scorer.RougeScorer(["rougeL"])
out["en_rouge"] = [list(default.score(r, h)["rougeL"]) for h, r in data["en"]]
tok = Tokenizer13a()
out["tok13a"] = [tok(s.rstrip()) for s in data["tok13a"]]
print(json.dumps(out))
)PY";

struct Smoothing {
  BleuSmoothing method;
  std::optional<double> value;
};
const Smoothing kSmoothing[] = {
    {BleuSmoothing::kExp, std::nullopt}, {BleuSmoothing::kFloor, std::nullopt},
    {BleuSmoothing::kFloor, 0.2},        {BleuSmoothing::kAddK, std::nullopt},
    {BleuSmoothing::kAddK, 0.5},         {BleuSmoothing::kNone, std::nullopt}};

void expect_close(double ours, double reference, const std::string& what) {
  EXPECT_NEAR(ours, reference, 1e-9 * std::max(1.0, std::fabs(reference))) << what;
}

TEST(ReferencePackages, BleuRougeAnd13aMatchSacrebleuAndRougeScore) {
  TESSERA_EVAL_REQUIRE_PYTHON(python, "sacrebleu", "rouge_score");
  const auto seg = YueSegmenter::load(testing::lexicon_path());

  // Cantonese pairs, segmented here and handed over as space-joined tokens
  // (sacreBLEU with tokenize='none').
  std::vector<Tokens> yue_refs, yue_hyps;
  const auto yue = cantonese_sentences();
  for (size_t k = 0; k < yue.size(); ++k) {
    yue_refs.push_back(seg.segment(yue[k]));
    yue_hyps.push_back(perturb(yue_refs.back(), seg.segment(yue[(k + 7) % yue.size()]), k));
  }
  yue_hyps.push_back({});  // an empty hypothesis
  yue_refs.push_back(seg.segment(yue[0]));
  // English pairs as raw text (sacreBLEU's default 13a tokenizer).
  std::vector<std::string> en_refs, en_hyps;
  const auto en = english_sentences();
  for (size_t k = 0; k < en.size(); ++k) {
    en_refs.push_back(en[k]);
    en_hyps.push_back(join(perturb(toks(en[k]), toks(en[(k + 5) % en.size()]), k)));
  }

  json input;
  for (size_t k = 0; k < yue_hyps.size(); ++k)
    input["yue"].push_back({join(yue_hyps[k]), join(yue_refs[k])});
  for (size_t k = 0; k < en_hyps.size(); ++k) input["en"].push_back({en_hyps[k], en_refs[k]});
  // Two reference streams for the first eight Cantonese hypotheses.
  std::vector<Tokens> multi_hyps(yue_hyps.begin(), yue_hyps.begin() + 8);
  std::vector<std::vector<Tokens>> multi_refs(2);
  for (size_t k = 0; k < 8; ++k) {
    multi_refs[0].push_back(yue_refs[k]);
    multi_refs[1].push_back(seg.segment(yue[(k + 1) % yue.size()]));
    input["multi"]["hyps"].push_back(join(multi_hyps[k]));
  }
  for (const auto& stream : multi_refs) {
    json s = json::array();
    for (const auto& r : stream) s.push_back(join(r));
    input["multi"]["refs"].push_back(s);
  }
  input["tok13a"] = en;
  for (const auto& h : en_hyps) input["tok13a"].push_back(h);

  testing::TempDir dir;
  const std::string in_path = dir.write("input.json", input.dump());
  const std::string out = testing::run_python(python, dir, kCheckScript, in_path);
  ASSERT_FALSE(out.empty());
  const json ref = json::parse(out);

  auto en_tokens = [](const std::string& s) { return split_whitespace(tokenize_13a(s)); };
  std::vector<Tokens> en_hyp_tokens, en_ref_tokens;
  for (size_t k = 0; k < en_hyps.size(); ++k) {
    en_hyp_tokens.push_back(en_tokens(en_hyps[k]));
    en_ref_tokens.push_back(en_tokens(en_refs[k]));
  }
  size_t checked = 0;
  for (size_t m = 0; m < std::size(kSmoothing); ++m) {
    BleuOptions o;
    o.smoothing = kSmoothing[m].method;
    o.smooth_value = kSmoothing[m].value;
    expect_close(corpus_bleu(yue_hyps, {yue_refs}, o).score, ref["yue_corpus"][m], "yue corpus");
    expect_close(corpus_bleu(en_hyp_tokens, {en_ref_tokens}, o).score, ref["en_corpus"][m],
                 "en corpus");
    for (size_t k = 0; k < yue_hyps.size(); ++k, ++checked) {
      expect_close(corpus_bleu({yue_hyps[k]}, {{yue_refs[k]}}, o).score, ref["yue_sentence"][k][m],
                   "yue pair " + std::to_string(k) + " smoothing " + std::to_string(m));
    }
    for (size_t k = 0; k < en_hyps.size(); ++k, ++checked) {
      expect_close(corpus_bleu({en_hyp_tokens[k]}, {{en_ref_tokens[k]}}, o).score,
                   ref["en_sentence"][k][m], "en pair " + std::to_string(k) + ": " + en_hyps[k]);
    }
  }
  BleuOptions effective;
  effective.effective_order = true;
  for (size_t k = 0; k < yue_hyps.size(); ++k) {
    expect_close(corpus_bleu({yue_hyps[k]}, {{yue_refs[k]}}, effective).score,
                 ref["yue_effective"][k], "yue effective order " + std::to_string(k));
  }
  for (size_t k = 0; k < en_hyps.size(); ++k) {
    expect_close(corpus_bleu({en_hyp_tokens[k]}, {{en_ref_tokens[k]}}, effective).score,
                 ref["en_effective"][k], "en effective order " + std::to_string(k));
  }
  expect_close(corpus_bleu(multi_hyps, multi_refs).score, ref["multi"], "two reference streams");

  for (size_t k = 0; k < yue_hyps.size(); ++k) {
    const RougeScore s = rouge_l(yue_refs[k], yue_hyps[k]);
    expect_close(s.precision, ref["yue_rouge"][k][0], "yue rouge P " + std::to_string(k));
    expect_close(s.recall, ref["yue_rouge"][k][1], "yue rouge R " + std::to_string(k));
    expect_close(s.fmeasure, ref["yue_rouge"][k][2], "yue rouge F " + std::to_string(k));
  }
  for (size_t k = 0; k < en_hyps.size(); ++k) {
    const RougeScore s = rouge_l(rouge_tokenize(en_refs[k]), rouge_tokenize(en_hyps[k]));
    expect_close(s.fmeasure, ref["en_rouge"][k][2], "en rouge F " + std::to_string(k));
    expect_close(s.precision, ref["en_rouge"][k][0], "en rouge P " + std::to_string(k));
  }
  for (size_t k = 0; k < input["tok13a"].size(); ++k) {
    const std::string s = input["tok13a"][k];
    std::string trimmed = s;
    while (!trimmed.empty() &&
           (trimmed.back() == ' ' || trimmed.back() == '\n' || trimmed.back() == '\t')) {
      trimmed.pop_back();
    }
    EXPECT_EQ(tokenize_13a(trimmed), ref["tok13a"][k].get<std::string>()) << s;
  }
  // Many pairs, every smoothing method (fewer without the Yue-Benchmark
  // sentences, which add 40 Cantonese and 40 English pairs).
  EXPECT_GT(checked, testing::have_yue_data() ? 300u : 100u);
}

constexpr const char* kRandomScript = R"PY(
import json, math, random, sys

data = json.load(open(sys.argv[1]))
xs = data["values"]

def mean(a):
    return sum(a) / len(a)

def sample_stddev(a):
    mu = mean(a)
    return math.sqrt(sum((x - mu) ** 2 for x in a) / (len(a) - 1))

# lm-evaluation-harness's bootstrap_stderr, without the process pool.
def bootstrap_stderr(f, xs, iters):
    res = []
    chunk_size = min(1000, iters)
    for i in range(iters // chunk_size):
        rnd = random.Random()
        rnd.seed(i)
        for _ in range(chunk_size):
            res.append(f(rnd.choices(xs, k=len(xs))))
    return sample_stddev(res)

print(json.dumps({"bootstrap": bootstrap_stderr(mean, xs, data["iters"])}))
)PY";

TEST(ReferencePackages, BootstrapReplicatesLmEval) {
  TESSERA_EVAL_REQUIRE_PYTHON(python);
  std::vector<double> xs;
  for (int i = 0; i < 137; ++i) xs.push_back(std::sin(i * 0.37) + (i % 5 == 0 ? 2.0 : 0.0));
  json input = {{"values", xs}, {"iters", 2000}};
  testing::TempDir dir;
  const json ref = json::parse(
      testing::run_python(python, dir, kRandomScript, dir.write("in.json", input.dump())));
  auto mean_of = [&](const std::vector<size_t>& idx) {
    double s = 0;
    for (size_t k : idx) s += xs[k];
    return s / static_cast<double>(idx.size());
  };
  // Same replicates, so equal up to summation order.
  EXPECT_NEAR(bootstrap_stderr(mean_of, xs.size(), {2000}), ref["bootstrap"].get<double>(), 1e-12);
}

}  // namespace
}  // namespace tessera::eval
