#include "tessera/tokenizer/tokenizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "tessera/core/error.h"
#include "tessera/tokenizer/tokenizer_folder.h"

namespace tessera::nn {
namespace {

// ../shared/testdata beside the repository, or $TESSERA_TESTDATA.
std::string testdata_dir() {
  if (const char* env = std::getenv("TESSERA_TESTDATA")) return env;
  return std::string(TESSERA_SOURCE_DIR) + "/../shared/testdata";
}

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

#define SKIP_UNLESS_EXISTS(path) \
  if (!file_exists(path)) GTEST_SKIP() << "test data not found: " << (path)

// The vocabulary-form symbol of a byte, following GPT-2's byte-to-unicode map
// independently of the implementation: printable Latin-1 is itself, the rest
// U+0100 upwards in byte order.
std::string symbol(int byte) {
  int cp = byte;
  const auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
  };
  if (!printable(byte)) {
    cp = 0x100;
    for (int b = 0; b < byte; ++b) cp += printable(b) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s.push_back(char(cp));
  } else {
    s.push_back(char(0xC0 | (cp >> 6)));
    s.push_back(char(0x80 | (cp & 0x3F)));
  }
  return s;
}

std::vector<int32_t> bytes_of(std::string_view text) {
  std::vector<int32_t> ids;
  for (unsigned char c : text) ids.push_back(c);
  return ids;
}

// A hand-made vocabulary: ids 0..255 are the bytes, then merged tokens.
//   256 lo    257 low   258 er    259 Ġl    260 Ġlow  261 aa
//   262 aaaa  263 bc    264 ab    265 xyz (in no merge)
// Merge ranks: l+o, lo+w, e+r, Ġ+l, Ġ+low, a+a, aa+aa, b+c, a+b.
TokenizerSpec toy_spec() {
  TokenizerSpec spec;
  for (int b = 0; b < 256; ++b) spec.vocab.push_back(symbol(b));
  for (const char* t : {"lo", "low", "er", "Ġl", "Ġlow", "aa", "aaaa", "bc", "ab", "xyz"}) {
    spec.vocab.push_back(t);
  }
  spec.merges = {{"l", "o"}, {"lo", "w"},  {"e", "r"}, {"Ġ", "l"}, {"Ġ", "low"},
                 {"a", "a"}, {"aa", "aa"}, {"b", "c"}, {"a", "b"}};
  return spec;
}

constexpr int32_t kLow = 257, kEr = 258, kSpaceLow = 260, kLo = 256, kAa = 261, kAaaa = 262,
                  kBc = 263, kXyz = 265;

// ---------------------------------------------------------------------------
// BPE on a hand-made vocabulary.

TEST(Tokenizer, HandComputedMerges) {
  const Tokenizer tok = Tokenizer::from_spec(toy_spec());
  EXPECT_EQ(tok.vocab_size(), 266);
  EXPECT_EQ(tok.encode("lower"), (std::vector<int32_t>{kLow, kEr}));
  // Ġ+l (rank 3) never fires: l+o and lo+w come first and leave no "l".
  EXPECT_EQ(tok.encode(" lower"), (std::vector<int32_t>{kSpaceLow, kEr}));
  EXPECT_EQ(tok.encode("hello"), (std::vector<int32_t>{'h', 'e', 'l', kLo}));
  // Equal pairs merge leftmost first; a later rank then joins the results.
  EXPECT_EQ(tok.encode("aaa"), (std::vector<int32_t>{kAa, 'a'}));
  EXPECT_EQ(tok.encode("aaaa"), (std::vector<int32_t>{kAaaa}));
  EXPECT_EQ(tok.encode("aaaaa"), (std::vector<int32_t>{kAaaa, 'a'}));
  // b+c outranks a+b, so "abc" is a + bc, not ab + c.
  EXPECT_EQ(tok.encode("abc"), (std::vector<int32_t>{'a', kBc}));
  // GPT-2 splits "lower lo" into "lower" and " lo" before merging; in " lo"
  // l+o outranks Ġ+l.
  EXPECT_EQ(tok.encode("lower lo"), (std::vector<int32_t>{kLow, kEr, ' ', kLo}));
  EXPECT_EQ(tok.encode(""), std::vector<int32_t>{});
}

TEST(Tokenizer, IgnoreMergesTakesWholeWordsFromTheVocabulary) {
  TokenizerSpec spec = toy_spec();
  EXPECT_EQ(Tokenizer::from_spec(spec).encode("xyz"), bytes_of("xyz"));
  spec.ignore_merges = true;
  const Tokenizer tok = Tokenizer::from_spec(spec);
  EXPECT_EQ(tok.encode("xyz"), (std::vector<int32_t>{kXyz}));
  EXPECT_EQ(tok.encode("xyzw"), bytes_of("xyzw"));  // not a token: merged as usual
}

TEST(Tokenizer, DecodeAndTokenLookups) {
  const Tokenizer tok = Tokenizer::from_spec(toy_spec());
  EXPECT_EQ(tok.decode({kSpaceLow, kEr, '!'}), " lower!");
  EXPECT_EQ(tok.id_to_token(kSpaceLow), "Ġlow");
  EXPECT_EQ(tok.token_to_id("Ġlow"), kSpaceLow);
  EXPECT_EQ(tok.token_to_id("Ġ"), ' ');
  EXPECT_THROW((void)tok.token_to_id("nope"), NotFound);
  EXPECT_THROW((void)tok.id_to_token(266), InvalidArgument);
  EXPECT_THROW((void)tok.id_to_token(-1), InvalidArgument);
  EXPECT_THROW((void)tok.decode({1, 266}), InvalidArgument);
  EXPECT_FALSE(tok.bos_id().has_value());
}

TEST(Tokenizer, RandomBytesRoundTrip) {
  const Tokenizer tok = Tokenizer::from_spec(toy_spec());
  std::mt19937 rng(42);
  for (int trial = 0; trial < 500; ++trial) {
    std::string text(rng() % 64, '\0');
    for (char& c : text) c = char(rng() % 256);
    EXPECT_EQ(tok.decode(tok.encode(text)), text);
  }
}

// ---------------------------------------------------------------------------
// Added tokens.

TokenizerSpec spec_with_added() {
  TokenizerSpec spec = toy_spec();
  spec.added = {{"<|end|>", 266, true},
                {"<|end|>!", 267, true},  // longer, shares a prefix: longest match wins
                {"<tool>", 268, false},
                {"<s>", 269, true, /*lstrip=*/true, /*rstrip=*/true}};
  spec.eos_id = 266;
  spec.bos_id = 269;
  return spec;
}

TEST(Tokenizer, AddedTokensMatchLongestFirst) {
  const Tokenizer tok = Tokenizer::from_spec(spec_with_added());
  EXPECT_EQ(tok.vocab_size(), 270);
  EXPECT_EQ(tok.encode("low<|end|>low"), (std::vector<int32_t>{kLow, 266, kLow}));
  EXPECT_EQ(tok.encode("<|end|>!low"), (std::vector<int32_t>{267, kLow}));
  EXPECT_EQ(tok.encode("<|end|><|end|>"), (std::vector<int32_t>{266, 266}));
  EXPECT_EQ(tok.encode("<|end|"), bytes_of("<|end|"));
  EXPECT_EQ(tok.token_to_id("<tool>"), 268);
  EXPECT_EQ(tok.id_to_token(268), "<tool>");
  EXPECT_TRUE(tok.is_special(266));
  EXPECT_FALSE(tok.is_special(268));
  EXPECT_FALSE(tok.is_special(kLow));
  EXPECT_EQ(tok.eos_id(), 266);
}

// Regression: lookups by name must survive added ids that extend the
// vocabulary (the id table grows while the name index is built).
TEST(Tokenizer, EveryIdRoundTripsThroughItsName) {
  TokenizerSpec spec = spec_with_added();
  spec.vocab.shrink_to_fit();  // no spare capacity, so growing it reallocates
  const Tokenizer tok = Tokenizer::from_spec(std::move(spec));
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    EXPECT_EQ(tok.token_to_id(tok.id_to_token(id)), id) << tok.id_to_token(id);
  }
}

TEST(Tokenizer, ParseSpecialOffLeavesControlTokensAsText) {
  const Tokenizer tok = Tokenizer::from_spec(spec_with_added());
  const std::string text = "<tool>low<|end|>";
  EXPECT_EQ(tok.encode(text, /*parse_special=*/true), (std::vector<int32_t>{268, kLow, 266}));
  std::vector<int32_t> plain = tok.encode(text, /*parse_special=*/false);
  EXPECT_EQ(plain.front(), 268) << "non-special added tokens always match";
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 266), 0);
  EXPECT_EQ(tok.decode(plain), text);
}

TEST(Tokenizer, DecodeSkipsSpecialTokensOnRequest) {
  const Tokenizer tok = Tokenizer::from_spec(spec_with_added());
  const std::vector<int32_t> ids = tok.encode("<tool>low<|end|>");
  EXPECT_EQ(tok.decode(ids), "<tool>low<|end|>");
  EXPECT_EQ(tok.decode(ids, /*skip_special=*/true), "<tool>low");
}

TEST(Tokenizer, LstripAndRstripSwallowWhiteSpace) {
  const Tokenizer tok = Tokenizer::from_spec(spec_with_added());
  EXPECT_EQ(tok.encode("low \t<s>\u3000 low"), (std::vector<int32_t>{kLow, 269, kLow}));
  EXPECT_EQ(tok.encode("low<|end|> low"), (std::vector<int32_t>{kLow, 266, kSpaceLow}));
}

// ---------------------------------------------------------------------------
// Spec validation.

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.message();
  }
  return "<no error>";
}

TEST(Tokenizer, RejectsMalformedSpecs) {
  TokenizerSpec bad_merge = toy_spec();
  bad_merge.merges.push_back({"q", "zz"});
  EXPECT_NE(error_of([&] {
              (void)Tokenizer::from_spec(bad_merge);
            }).find("merge 9 ('q' 'zz'): its second half 'zz' is not in the vocabulary"),
            std::string::npos);

  TokenizerSpec bad_result = toy_spec();
  bad_result.merges.push_back({"q", "q"});
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_spec(bad_result); }).find("its result 'qq'"),
            std::string::npos);

  TokenizerSpec hole = toy_spec();
  hole.added = {{"<a>", 300, true}};
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_spec(hole); }).find("token id 266"),
            std::string::npos);

  TokenizerSpec empty_added = toy_spec();
  empty_added.added = {{"", 266, true}};
  EXPECT_THROW((void)Tokenizer::from_spec(empty_added), InvalidArgument);

  TokenizerSpec bad_bos = toy_spec();
  bad_bos.bos_id = 266;
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_spec(bad_bos); }).find("bos_id 266"),
            std::string::npos);

  EXPECT_THROW((void)Tokenizer::from_spec(TokenizerSpec{}), InvalidArgument);
}

TEST(Tokenizer, MissingByteSymbolNeedsUnk) {
  TokenizerSpec spec;
  for (const char* t : {"a", "b", "ab", "?"}) spec.vocab.push_back(t);
  spec.merges = {{"a", "b"}};
  {
    const Tokenizer tok = Tokenizer::from_spec(spec);
    EXPECT_EQ(tok.encode("ab"), (std::vector<int32_t>{2}));
    EXPECT_NE(error_of([&] { (void)tok.encode("abc"); }).find("byte 0x63"), std::string::npos);
  }
  spec.unk_id = 3;
  EXPECT_EQ(Tokenizer::from_spec(spec).encode("abc"), (std::vector<int32_t>{2, 3}));
}

// ---------------------------------------------------------------------------
// Pre-tokenizers. Expected splits are those of Hugging Face tokenizers 0.23
// (ByteLevel, Split with each regex, Digits + ByteLevel).

struct SplitCase {
  PreTokenizerKind kind;
  std::string text;
  std::vector<std::string> words;
};

TEST(PreTokenize, MatchesReferenceSplits) {
  const std::vector<SplitCase> cases = {
      {PreTokenizerKind::kGpt2, "Hello world! 123", {"Hello", " world", "!", " 123"}},
      {PreTokenizerKind::kGpt2, "  multiple   spaces", {" ", " multiple", "  ", " spaces"}},
      {PreTokenizerKind::kGpt2,
       "I'm here, they'll go; it's 'SO'",
       {"I", "'m", " here", ",", " they", "'ll", " go", ";", " it", "'s", " '", "SO", "'"}},
      {PreTokenizerKind::kGpt2, "\n\n  foo\tbar \r\n", {"\n\n ", " foo", "\t", "bar", " \r\n"}},
      {PreTokenizerKind::kGpt2, "12345 x1234567", {"12345", " x", "1234567"}},
      {PreTokenizerKind::kGpt2,
       "(hello) [world]...\n\n",
       {"(", "hello", ")", " [", "world", "]...", "\n\n"}},
      {PreTokenizerKind::kGpt2,
       "我哋今日去飲茶，好唔好？",
       {"我哋今日去飲茶", "，", "好唔好", "？"}},
      {PreTokenizerKind::kGpt2, "x  \u00a0y", {"x", "  ", "\u00a0", "y"}},
      {PreTokenizerKind::kGpt2, "don'T STOP'RE", {"don", "'", "T", " STOP", "'", "RE"}},
      {PreTokenizerKind::kGpt2, "end   ", {"end", "   "}},
      {PreTokenizerKind::kLlama3, "Hello world! 123", {"Hello", " world", "!", " ", "123"}},
      {PreTokenizerKind::kLlama3, "\n\n  foo\tbar \r\n", {"\n\n", " ", " foo", "\tbar", " \r\n"}},
      {PreTokenizerKind::kLlama3, "12345 x1234567", {"123", "45", " x", "123", "456", "7"}},
      {PreTokenizerKind::kLlama3,
       "(hello) [world]...\n\n",
       {"(hello", ")", " [", "world", "]...\n\n"}},
      {PreTokenizerKind::kLlama3, "我哋今日去飲茶，好唔好？", {"我哋今日去飲茶", "，好唔好", "？"}},
      {PreTokenizerKind::kLlama3, "x  \u00a0y", {"x", "  ", "\u00a0y"}},
      {PreTokenizerKind::kLlama3, "don'T STOP'RE", {"don", "'T", " STOP", "'RE"}},
      {PreTokenizerKind::kLlama3, "IT'ſ OK", {"IT", "'ſ", " OK"}},  // long s folds to s
      {PreTokenizerKind::kQwen2, "Hello world! 123", {"Hello", " world", "!", " ", "1", "2", "3"}},
      {PreTokenizerKind::kQwen2, "a 12b", {"a", " ", "1", "2", "b"}},
      {PreTokenizerKind::kQwen2, "\n\n  foo\tbar \r\n", {"\n\n", " ", " foo", "\tbar", " \r\n"}},
      {PreTokenizerKind::kSmolLM, "Hello world! 123", {"Hello", " world", "!", " ", "1", "2", "3"}},
      {PreTokenizerKind::kSmolLM, "a 12b", {"a", " ", "1", "2", "b"}},
      {PreTokenizerKind::kSmolLM, "\n\n  foo\tbar \r\n", {"\n\n ", " foo", "\t", "bar", " \r\n"}},
      {PreTokenizerKind::kNone, "a 12b", {"a 12b"}},
  };
  for (const SplitCase& c : cases) {
    const std::vector<std::string_view> got = pre_tokenize(c.text, c.kind);
    EXPECT_EQ(std::vector<std::string>(got.begin(), got.end()), c.words)
        << pre_tokenizer_name(c.kind) << " on '" << c.text << "'";
  }
}

TEST(PreTokenize, InvalidUtf8IsPunctuationAndCoverageIsExact) {
  const std::string text = "ab\xff\xfe cd\xe6\x88 1\x80";
  EXPECT_EQ(std::vector<std::string>({"ab", "\xff\xfe", " cd", "\xe6\x88", " 1", "\x80"}), [&] {
    auto w = pre_tokenize(text, PreTokenizerKind::kGpt2);
    return std::vector<std::string>(w.begin(), w.end());
  }());
  std::mt19937 rng(7);
  for (PreTokenizerKind kind : {PreTokenizerKind::kGpt2, PreTokenizerKind::kLlama3,
                                PreTokenizerKind::kQwen2, PreTokenizerKind::kSmolLM}) {
    for (int trial = 0; trial < 200; ++trial) {
      std::string s(rng() % 40, '\0');
      for (char& c : s) c = char(rng() % 256);
      std::string joined;
      for (std::string_view w : pre_tokenize(s, kind)) {
        EXPECT_FALSE(w.empty());
        joined += w;
      }
      EXPECT_EQ(joined, s);
    }
  }
}

TEST(PreTokenize, GgufNames) {
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("gpt-2"), PreTokenizerKind::kGpt2);
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("default"), PreTokenizerKind::kGpt2);
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("llama-bpe"), PreTokenizerKind::kLlama3);
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("qwen2"), PreTokenizerKind::kQwen2);
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("smollm"), PreTokenizerKind::kSmolLM);
  EXPECT_EQ(Tokenizer::pre_tokenizer_from_gguf_name("starcoder"), PreTokenizerKind::kSmolLM);
  EXPECT_NE(error_of([] {
              (void)Tokenizer::pre_tokenizer_from_gguf_name("deepseek-llm");
            }).find("'deepseek-llm'"),
            std::string::npos);
}

// ---------------------------------------------------------------------------
// NFC.

TEST(Tokenizer, NfcNormalizerComposes) {
  TokenizerSpec spec = toy_spec();
  spec.normalizer = NormalizerKind::kNfc;
  const Tokenizer tok = Tokenizer::from_spec(spec);
  EXPECT_EQ(tok.normalize("Cafe\u0301"), "Caf\u00e9");
  EXPECT_EQ(tok.normalize("\u212b"), "\u00c5");                // angstrom sign: singleton
  EXPECT_EQ(tok.normalize("\u1100\u1161\u11a8"), "\uac01");    // Hangul L V T
  EXPECT_EQ(tok.normalize("q\u0307\u0323"), "q\u0323\u0307");  // canonical order
  EXPECT_EQ(tok.normalize("a\u0323\u0302"), "\u1ead");         // two marks, one letter
  EXPECT_EQ(tok.normalize("\u0958"), "\u0915\u093c");          // composition exclusion
  EXPECT_EQ(tok.normalize("e\xff\u0301"), "e\xff\u0301");      // a stray byte blocks
  EXPECT_EQ(tok.decode(tok.encode("Cafe\u0301")), "Caf\u00e9");
  EXPECT_EQ(Tokenizer::from_spec(toy_spec()).normalize("Cafe\u0301"), "Cafe\u0301");
}

// ---------------------------------------------------------------------------
// GPT-2 (OpenAI's files) against tiktoken's r50k_base.

// Loaded once for the whole suite (it takes a while); null when absent.
const Tokenizer* gpt2_tokenizer() {
  static const std::optional<Tokenizer> tok = []() -> std::optional<Tokenizer> {
    const std::string dir = testdata_dir() + "/tokenizers/gpt2/";
    if (!file_exists(dir + "encoder.json") || !file_exists(dir + "vocab.bpe")) return std::nullopt;
    return Tokenizer::from_gpt2_files(dir + "encoder.json", dir + "vocab.bpe");
  }();
  return tok ? &*tok : nullptr;
}

class Gpt2Test : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpt2_tokenizer() == nullptr)
      GTEST_SKIP() << "GPT-2 files not found under " << testdata_dir();
  }
  static const Tokenizer& tok() { return *gpt2_tokenizer(); }
};

struct Plan {
  std::string sample;
  std::vector<int32_t> expected;
};

// TestPlans.txt: blocks of "EncodingName: X", "Sample: <text>", "Encoded: [ids]"
// separated by blank lines; samples are single lines.
std::vector<Plan> read_plans(const std::string& path, const std::string& encoding) {
  std::istringstream in(read_all(path));
  std::vector<Plan> plans;
  std::string line, name, sample;
  while (std::getline(in, line)) {
    if (line.rfind("EncodingName: ", 0) == 0) {
      name = line.substr(14);
    } else if (line.rfind("Sample: ", 0) == 0) {
      sample = line.substr(8);
    } else if (line == "Sample:") {
      sample.clear();
    } else if (line.rfind("Encoded: [", 0) == 0 && name == encoding) {
      Plan plan{sample, {}};
      std::istringstream ids(line.substr(10));
      std::string id;
      while (std::getline(ids, id, ',')) {
        if (id.find_first_of("0123456789") != std::string::npos)
          plan.expected.push_back(std::stoi(id));
      }
      plans.push_back(std::move(plan));
    }
  }
  return plans;
}

TEST_F(Gpt2Test, MatchesTiktokenR50kOnAll64Plans) {
  const std::string path = testdata_dir() + "/tokenizers/tiktoken/TestPlans.txt";
  SKIP_UNLESS_EXISTS(path);
  const std::vector<Plan> plans = read_plans(path, "r50k_base");
  ASSERT_EQ(plans.size(), 64u);
  int matched = 0;
  for (const Plan& p : plans) {
    const std::vector<int32_t> ids = tok().encode(p.sample);
    EXPECT_EQ(ids, p.expected) << "sample: " << p.sample;
    EXPECT_EQ(tok().decode(ids), p.sample);
    matched += ids == p.expected;
  }
  std::printf("r50k_base conformance: %d / %zu samples match\n", matched, plans.size());
}

TEST_F(Gpt2Test, VocabularyAndEndOfText) {
  EXPECT_EQ(tok().vocab_size(), 50257);
  EXPECT_EQ(tok().token_to_id("<|endoftext|>"), 50256);
  EXPECT_EQ(tok().eos_id(), 50256);
  EXPECT_EQ(tok().bos_id(), 50256);
  EXPECT_EQ(tok().encode("Hello<|endoftext|>"), (std::vector<int32_t>{15496, 50256}));
  EXPECT_EQ(tok().encode("<|endoftext|>", /*parse_special=*/false),
            (std::vector<int32_t>{27, 91, 437, 1659, 5239, 91, 29}));
}

TEST_F(Gpt2Test, RoundTripsArbitraryBytes) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    std::string text(rng() % 200, '\0');
    for (char& c : text) c = char(rng() % 256);
    EXPECT_EQ(tok().decode(tok().encode(text)), text);
  }
  for (const std::string& text : std::vector<std::string>{
           "我哋今日去飲茶，好唔好？", "佢話聽日落雨，記得帶遮呀！",
           "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👩🏽‍💻 coder, "
           "🧑‍🤝‍🧑",
           "mixed: naïve café 東京 ١٢٣ \u2028 tab\tcr\r\n", std::string("nul\0byte", 8)}) {
    EXPECT_EQ(tok().decode(tok().encode(text)), text);
  }
}

// A whole book (1.2 MB of prose) encodes and decodes back byte for byte.
// (Encoding speed is a benchmark's business, not a unit test's.)
TEST_F(Gpt2Test, EncodesMobyDickAndDecodesItBack) {
  const std::string path = testdata_dir() + "/text/moby-dick.txt";
  SKIP_UNLESS_EXISTS(path);
  const std::string text = read_all(path);
  const std::vector<int32_t> ids = tok().encode(text);
  // English prose is about 4 bytes per GPT-2 token.
  EXPECT_GT(ids.size(), text.size() / 6);
  EXPECT_LT(ids.size(), text.size() / 3);
  EXPECT_EQ(tok().decode(ids), text);
}

TEST_F(Gpt2Test, ConcurrentEncodesAgree) {
  const std::string text = "The quick brown fox jumps over 13 lazy dogs. 😺 我哋今日去飲茶";
  const std::vector<int32_t> expected = tok().encode(text);
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const Tokenizer copy = tok();  // copies share the vocabulary
      for (int i = 0; i < 200; ++i) mismatches[t] += copy.encode(text) != expected;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

// ---------------------------------------------------------------------------
// Qwen3's tokenizer.json. Expected ids are Hugging Face tokenizers' output.

const Tokenizer* qwen3_tokenizer() {
  static const std::optional<Tokenizer> tok = []() -> std::optional<Tokenizer> {
    const std::string path = testdata_dir() + "/tokenizers/qwen3/tokenizer.json";
    if (!file_exists(path)) return std::nullopt;
    return Tokenizer::from_tokenizer_json(path);
  }();
  return tok ? &*tok : nullptr;
}

class Qwen3Test : public ::testing::Test {
 protected:
  void SetUp() override {
    if (qwen3_tokenizer() == nullptr) {
      GTEST_SKIP() << "Qwen3 tokenizer.json not found under " << testdata_dir();
    }
  }
  static const Tokenizer& tok() { return *qwen3_tokenizer(); }
};

TEST_F(Qwen3Test, LoadsAddedTokensAndConfig) {
  EXPECT_EQ(tok().vocab_size(), 151669);
  EXPECT_EQ(tok().pre_tokenizer(), PreTokenizerKind::kQwen2);
  EXPECT_EQ(tok().normalizer(), NormalizerKind::kNfc);
  EXPECT_EQ(tok().token_to_id("<|endoftext|>"), 151643);
  EXPECT_EQ(tok().token_to_id("<|im_start|>"), 151644);
  EXPECT_EQ(tok().token_to_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok().token_to_id("<think>"), 151667);
  EXPECT_EQ(tok().id_to_token(151644), "<|im_start|>");
  EXPECT_TRUE(tok().is_special(151644));
  EXPECT_FALSE(tok().is_special(151667));  // <think> is a plain added token
  EXPECT_EQ(tok().added_tokens().size(), 26u);
  for (int32_t id = 0; id < tok().vocab_size(); ++id) {
    ASSERT_EQ(tok().token_to_id(tok().id_to_token(id)), id) << tok().id_to_token(id);
  }
  // From tokenizer_config.json beside it.
  EXPECT_FALSE(tok().bos_id().has_value());
  EXPECT_EQ(tok().eos_id(), 151645);
  EXPECT_EQ(tok().pad_id(), 151643);
}

TEST_F(Qwen3Test, MatchesReferenceEncodings) {
  const std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {"<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
       {151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198, 151667, 271, 151668,
        271}},
      {"我哋今日去飲茶，好唔好？",
       {35946, 20047, 233, 102242, 85336, 113515, 100019, 3837, 52801, 118121, 52801, 11319}},
      {"Cafe\u0301 déjà vu 12345", {34, 2577, 963, 45839, 32514, 220, 16, 17, 18, 19, 20}},
      {"👨‍👩‍👧‍👦 family",
       {145367, 378, 235, 145233, 378, 235, 145665, 378, 235, 145988, 2997}},
      {"def f(x):\n    return x**2  # 😀",
       {750, 282, 2075, 982, 262, 470, 856, 334, 17, 220, 671, 90316}},
  };
  for (const auto& [text, expected] : cases) EXPECT_EQ(tok().encode(text), expected) << text;
}

TEST_F(Qwen3Test, ParseSpecialControlsChatMarkers) {
  const std::string chat = "<|im_start|>user\nHi<|im_end|><think>";
  const std::vector<int32_t> parsed = tok().encode(chat, /*parse_special=*/true);
  const std::vector<int32_t> plain = tok().encode(chat, /*parse_special=*/false);
  auto has = [](const std::vector<int32_t>& ids, int32_t id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  EXPECT_TRUE(has(parsed, 151644));
  EXPECT_TRUE(has(parsed, 151645));
  EXPECT_FALSE(has(plain, 151644));
  EXPECT_FALSE(has(plain, 151645));
  EXPECT_TRUE(has(plain, 151667)) << "<think> is not special and always matches";
  EXPECT_EQ(tok().decode(parsed), chat);
  EXPECT_EQ(tok().decode(plain), chat);
  EXPECT_EQ(tok().decode(parsed, /*skip_special=*/true), "user\nHi<think>");
}

// Appends the UTF-8 form of a code point (test-side, independent of src/).
void append_utf8(std::string& s, char32_t cp) {
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
}

TEST_F(Qwen3Test, RoundTripsArbitraryUtf8) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 300; ++trial) {
    std::string text;
    const int n = int(rng() % 40);
    for (int i = 0; i < n; ++i) {
      char32_t cp;
      switch (rng() % 4) {
        case 0:
          cp = 0x20 + rng() % 0x60;
          break;  // ASCII
        case 1:
          cp = 0x80 + rng() % 0x780;
          break;  // 2-byte, incl. combining marks
        case 2:
          cp = 0x800 + rng() % (0x10000 - 0x800);
          break;
        default:
          cp = 0x10000 + rng() % 0x100000;
          break;
      }
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
      append_utf8(text, cp);
    }
    // NFC tokenizers return the normalized text; for text already in NFC
    // (most of it) that is the input itself.
    EXPECT_EQ(tok().decode(tok().encode(text)), tok().normalize(text));
  }
  for (const std::string& text :
       std::vector<std::string>{"我哋今日去飲茶，好唔好？", "👩🏽‍💻 and 🏳️‍🌈"}) {
    EXPECT_EQ(tok().decode(tok().encode(text)), text);
  }
}

// ---------------------------------------------------------------------------
// tokenizer.json and GPT-2 file errors.

class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "tessera_tok_XXXXXX";
    path_ = mkdtemp(tmpl.data()) ? tmpl : "";
  }
  ~TempDir() {
    for (const std::string& f : files_) std::remove(f.c_str());
    std::remove(path_.c_str());
  }
  std::string write(const std::string& name, const std::string& content) {
    const std::string file = path_ + "/" + name;
    std::ofstream(file, std::ios::binary) << content;
    files_.push_back(file);
    return file;
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

// A minimal byte-level BPE tokenizer.json with the given pre_tokenizer.
std::string tokenizer_json(const std::string& pre_tokenizer, const std::string& extra_model = "") {
  std::string vocab;
  for (int b = 0; b < 256; ++b) {
    std::string s = symbol(b);
    if (s == "\"" || s == "\\") s = "\\" + s;
    vocab += "\"" + s + "\": " + std::to_string(b) + ", ";
  }
  vocab += "\"lo\": 256";
  return R"({"version": "1.0", "added_tokens": [{"id": 257, "content": "<eos>", "special": true}],
  "normalizer": null, "pre_tokenizer": )" +
         pre_tokenizer +
         R"(, "decoder": {"type": "ByteLevel"},
  "model": {"type": "BPE", )" +
         extra_model + R"("vocab": {)" + vocab + R"(}, "merges": [["l", "o"]]}})";
}

const char* kByteLevel = R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})";

TEST(TokenizerJson, LoadsAMinimalFile) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.json", tokenizer_json(kByteLevel));
  const Tokenizer tok = Tokenizer::from_tokenizer_json(path);
  EXPECT_EQ(tok.vocab_size(), 258);
  EXPECT_EQ(tok.encode("lol<eos>"), (std::vector<int32_t>{256, 'l', 257}));
  EXPECT_FALSE(tok.eos_id().has_value());
}

TEST(TokenizerJson, ReadsSpecialTokensFromTheConfigBesideIt) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.json", tokenizer_json(kByteLevel));
  dir.write("tokenizer_config.json",
            R"({"bos_token": {"content": "lo", "__type": "AddedToken"}, "eos_token": "<eos>"})");
  const Tokenizer tok = Tokenizer::from_tokenizer_json(path);
  EXPECT_EQ(tok.bos_id(), 256);
  EXPECT_EQ(tok.eos_id(), 257);
  EXPECT_FALSE(tok.pad_id().has_value());
}

// Found by fuzz/tokenizer_json_fuzz.cpp: an added token whose id belongs
// to another vocabulary token ("!" here) made encode("!") and decode() of
// that id disagree.
TEST(TokenizerJson, AddedTokenOnAnotherVocabularyIdIsRefused) {
  TempDir dir;
  std::string text = tokenizer_json(kByteLevel);
  const std::string eos = R"({"id": 257, "content": "<eos>")";
  ASSERT_NE(text.find(eos), std::string::npos);
  text.replace(text.find(eos), eos.size(), R"({"id": 33, "content": "<eos>")");
  const std::string path = dir.write("tokenizer.json", text);
  const std::string message = error_of([&] { (void)Tokenizer::from_tokenizer_json(path); });
  EXPECT_NE(message.find(path + ": added token '<eos>' has id 33, which the vocabulary gives to "
                                "'!'"),
            std::string::npos)
      << message;
  // The same id for the same token (as GPT-2's file lists <|endoftext|>),
  // here "lo" at 256, is fine.
  text = tokenizer_json(kByteLevel);
  text.replace(text.find(eos), eos.size(), R"({"id": 256, "content": "lo")");
  const Tokenizer tok = Tokenizer::from_tokenizer_json(dir.write("same.json", text));
  EXPECT_EQ(tok.decode(tok.encode("lo!")), "lo!");
}

TEST(TokenizerJson, MalformedJsonNamesFileAndPosition) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.json", "{\n  \"model\": {,\n}");
  const std::string message = error_of([&] { (void)Tokenizer::from_tokenizer_json(path); });
  EXPECT_NE(message.find(path + ": malformed JSON at line 2, column 13"), std::string::npos)
      << message;
  EXPECT_THROW((void)Tokenizer::from_tokenizer_json(path + ".missing"), NotFound);
}

TEST(TokenizerJson, UnsupportedPiecesAreNamed) {
  TempDir dir;
  const std::string metaspace =
      dir.write("a.json", tokenizer_json(R"({"type": "Metaspace", "replacement": "▁"})"));
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_tokenizer_json(metaspace); }).find("Metaspace"),
            std::string::npos);

  const std::string regex =
      dir.write("b.json", tokenizer_json(R"({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{L}+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "use_regex": false}]})"));
  EXPECT_NE(error_of([&] {
              (void)Tokenizer::from_tokenizer_json(regex);
            }).find("Split regex '\\p{L}+' is not supported"),
            std::string::npos);

  const std::string prefix =
      dir.write("c.json", tokenizer_json(R"({"type": "ByteLevel", "add_prefix_space": true})"));
  EXPECT_NE(
      error_of([&] { (void)Tokenizer::from_tokenizer_json(prefix); }).find("add_prefix_space"),
      std::string::npos);

  const std::string fallback =
      dir.write("d.json", tokenizer_json(kByteLevel, R"("byte_fallback": true, )"));
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_tokenizer_json(fallback); }).find("byte_fallback"),
            std::string::npos);
}

TEST(TokenizerJson, RecognisesEachPreTokenizerFamily) {
  TempDir dir;
  const std::string split_then_byte_level =
      R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false}, {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})";
  EXPECT_EQ(
      Tokenizer::from_tokenizer_json(dir.write("l.json", tokenizer_json(split_then_byte_level)))
          .pre_tokenizer(),
      PreTokenizerKind::kLlama3);
  const std::string digits =
      R"({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})";
  EXPECT_EQ(
      Tokenizer::from_tokenizer_json(dir.write("s.json", tokenizer_json(digits))).pre_tokenizer(),
      PreTokenizerKind::kSmolLM);
  EXPECT_EQ(Tokenizer::from_tokenizer_json(dir.write("g.json", tokenizer_json(kByteLevel)))
                .pre_tokenizer(),
            PreTokenizerKind::kGpt2);
}

TEST(Gpt2Files, BadMergeLineIsNamed) {
  TempDir dir;
  const std::string encoder = dir.write("encoder.json", R"({"a": 0, "b": 1, "ab": 2})");
  const std::string merges = dir.write("vocab.bpe", "#version: 0.2\na b\nab\n");
  EXPECT_NE(error_of([&] { (void)Tokenizer::from_gpt2_files(encoder, merges); }).find("line 3"),
            std::string::npos);
  const std::string unknown = dir.write("vocab2.bpe", "#version: 0.2\na c\n");
  EXPECT_NE(error_of([&] {
              (void)Tokenizer::from_gpt2_files(encoder, unknown);
            }).find("its second half 'c' is not in the vocabulary"),
            std::string::npos);
  const std::string dup = dir.write("encoder2.json", R"({"a": 0, "b": 0})");
  EXPECT_THROW((void)Tokenizer::from_gpt2_files(dup, merges), InvalidArgument);
}

// Regression (the bug fuzz/sim_cluster_fuzz.cpp found in sim's JSON reader,
// present here too): a number too large for a double escaped
// from_tokenizer_json as nlohmann's out_of_range.406 instead of
// InvalidArgument naming the file.
TEST(TokenizerJson, FuzzNumberTooLargeForADoubleIsInvalidArgument) {
  TempDir dir;
  const std::string path = dir.write("tokenizer.json", R"({"model": {"dropout": 1e999}})");
  const std::string message = error_of([&] { (void)Tokenizer::from_tokenizer_json(path); });
  EXPECT_NE(message.find(path + ": malformed JSON"), std::string::npos) << message;
}

TEST(TokenizerFolder, WrittenFolderLoadsBackAsTheSameTokenizer) {
  EXPECT_EQ(byte_level_symbol(' '), "\xC4\xA0");  // "Ġ"
  EXPECT_EQ(byte_level_symbol('a'), "a");
  TokenizerSpec spec;
  for (int b = 0; b < 256; ++b) spec.vocab.push_back(byte_level_symbol(uint8_t(b)));
  const std::string space = byte_level_symbol(' ');
  spec.merges = {{"l", "o"}, {space, "lo"}, {"lo", "l"}};
  spec.vocab.insert(spec.vocab.end(), {"lo", space + "lo", "lol"});  // 256, 257, 258
  AddedToken eos, think;
  eos.content = "<|eos|>";
  eos.id = 259;
  think.content = "<think>";
  think.id = 260;
  think.special = false;
  spec.added = {eos, think};
  spec.eos_id = spec.pad_id = 259;
  spec.bos_id = 256;
  const Tokenizer expected = Tokenizer::from_spec(spec);

  TempDir dir;
  const std::string folder = dir.write("unused", "") + "_folder";
  write_tokenizer_folder(folder, spec, "{{ messages }}");
  const Tokenizer loaded = Tokenizer::from_tokenizer_json(folder + "/tokenizer.json");
  EXPECT_EQ(loaded.vocab_size(), 261);
  EXPECT_EQ(loaded.bos_id(), 256);
  EXPECT_EQ(loaded.eos_id(), 259);
  EXPECT_EQ(loaded.pad_id(), 259);
  EXPECT_TRUE(loaded.is_special(259));
  EXPECT_FALSE(loaded.is_special(260));
  for (const std::string text :
       {"lol lo lolol", "a <think>lo<|eos|> x", "\xC3\xA9t\xC3\xA9 9 lo"}) {
    EXPECT_EQ(loaded.encode(text), expected.encode(text)) << text;
    EXPECT_EQ(loaded.decode(loaded.encode(text)), text);
  }
  EXPECT_EQ(loaded.encode(" lo"), (std::vector<int32_t>{257}));
  std::ifstream config(folder + "/tokenizer_config.json");
  const std::string text((std::istreambuf_iterator<char>(config)),
                         std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"chat_template\": \"{{ messages }}\""), std::string::npos) << text;

  // What the file cannot hold, or from_spec refuses, writes nothing.
  TokenizerSpec smollm = spec;
  smollm.pre = PreTokenizerKind::kSmolLM;
  EXPECT_THROW(write_tokenizer_folder(folder + "_smollm", smollm), InvalidArgument);
  TokenizerSpec broken = spec;
  broken.merges.push_back({"x", "yz"});
  EXPECT_THROW(write_tokenizer_folder(folder + "_broken", broken), InvalidArgument);
  EXPECT_FALSE(file_exists(folder + "_broken/tokenizer.json"));
  std::remove((folder + "/tokenizer.json").c_str());
  std::remove((folder + "/tokenizer_config.json").c_str());
  std::remove(folder.c_str());
}

}  // namespace
}  // namespace tessera::nn
