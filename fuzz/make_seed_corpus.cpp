// make_seed_corpus — writes the seed corpus of every fuzz target.
//
//   make_seed_corpus OUT_DIR     (OUT_DIR/<target>/<seed>, one folder per target)
//
// Seeds are real files where the repository or ../shared/testdata has them
// (data/aws_lambda_prices.json, data/sim/a100_ib.json, the task files of
// data/eval/tasks, Qwen3's and GPT-2's tokenizers, SmolLM2's GGUF when
// scripts/install-deps.sh installed it), cut down to a size a fuzzer can
// mutate quickly while keeping their structure, and small valid files
// written with Tessera's own writers (save_safetensors, GgufWriter,
// save_adapter, ckpt::save, to_proto) for the formats that have no real
// file here. What is missing is skipped with a line on stderr.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "ckpt_fixture.h"
#include "fuzz_common.h"
#include "lora_fixture.h"
#include "tessera/ckpt/checkpoint.h"
#include "tessera/formats/gguf.h"
#include "tessera/formats/hf.h"
#include "tessera/formats/model_config.h"
#include "tessera/formats/safetensors.h"
#include "tessera/moe/function.pb.h"
#include "tessera/rlhf/worker.pb.h"
#include "tessera/rpc/rpc.h"

namespace fs = std::filesystem;
using nlohmann::json;
using tessera::fuzz::read_file;

namespace {

fs::path g_out;
const fs::path g_src = tessera::fuzz::source_dir();
const fs::path g_testdata = g_src.parent_path() / "shared" / "testdata";

void seed(const std::string& target, const std::string& name, const std::string& bytes) {
  fs::create_directories(g_out / target);
  tessera::fuzz::write_file((g_out / target / name).string(), bytes);
}

void missing(const std::string& what) {
  std::cerr << "make_seed_corpus: skipped (absent): " << what << "\n";
}

// --- Byte-level BPE vocabularies -------------------------------------------

// GPT-2's bytes_to_unicode: the printable symbol each byte stands for.
std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    const int cp = printable ? b : next++;
    std::string s;
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else {
      s += static_cast<char>(0xC0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3F));
    }
    out[b] = s;
  }
  return out;
}

struct Vocab {
  std::vector<std::string> tokens;  // by id
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<json> added;  // tokenizer.json added_tokens entries (id renumbered)
};

// The 256 byte symbols, the first `keep` tokens of `tokens` (by id) and the
// merges that only involve kept tokens, renumbered without holes; added
// tokens get the ids after the vocabulary (or keep their place when they
// are inside it).
Vocab shrink(const std::vector<std::string>& tokens,
             const std::vector<std::pair<std::string, std::string>>& merges, const json& added,
             size_t keep) {
  std::set<std::string> kept;
  for (const auto& s : byte_symbols()) kept.insert(s);
  std::set<std::string> added_contents;
  for (const auto& a : added) added_contents.insert(a["content"].get<std::string>());
  Vocab v;
  std::set<std::string> in_vocab;
  for (size_t id = 0; id < tokens.size(); ++id) {
    if (id < keep || kept.count(tokens[id])) {
      if (in_vocab.insert(tokens[id]).second) v.tokens.push_back(tokens[id]);
    }
  }
  for (const auto& [a, b] : merges) {
    if (in_vocab.count(a) && in_vocab.count(b) && in_vocab.count(a + b))
      v.merges.emplace_back(a, b);
  }
  std::map<std::string, size_t> id_of;
  for (size_t i = 0; i < v.tokens.size(); ++i) id_of[v.tokens[i]] = i;
  size_t next = v.tokens.size();
  for (const auto& a : added) {
    json t = a;
    auto it = id_of.find(a["content"].get<std::string>());
    t["id"] = it != id_of.end() ? it->second : next++;
    v.added.push_back(t);
  }
  return v;
}

json tokenizer_json(const Vocab& v, const json& normalizer, const json& pre_tokenizer,
                    bool merges_as_pairs) {
  json vocab = json::object(), merges = json::array();
  for (size_t i = 0; i < v.tokens.size(); ++i) vocab[v.tokens[i]] = i;
  for (const auto& [a, b] : v.merges)
    merges.push_back(merges_as_pairs ? json::array({a, b}) : json(a + " " + b));
  const json byte_level = {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", false},
                           {"use_regex", false}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", v.added},
          {"normalizer", normalizer},
          {"pre_tokenizer", pre_tokenizer},
          {"post_processor", byte_level},
          {"decoder", byte_level},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", ""},
            {"end_of_word_suffix", ""},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merges}}}};
}

json added_token(const std::string& content, bool special) {
  return {{"id", 0},         {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", special}};
}

std::string smollm2_gguf() {
  if (const char* env = std::getenv("TESSERA_SMOLLM2_GGUF")) return env;
  FILE* p = popen((g_src / "scripts" / "smollm2-path.sh").string().c_str(), "r");
  if (!p) return "";
  char buf[4096] = {0};
  std::string path = fgets(buf, sizeof buf, p) ? std::string(buf) : "";
  pclose(p);
  while (!path.empty() && (path.back() == '\n' || path.back() == '\r')) path.pop_back();
  return fs::exists(path) ? path : "";
}

// --- Targets ------------------------------------------------------------------

void tokenizer_seeds() {
  const json nfc = {{"type", "NFC"}};
  const json qwen_pre = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})");
  const json gpt2_pre = {{"type", "ByteLevel"},
                         {"add_prefix_space", false},
                         {"trim_offsets", true},
                         {"use_regex", true}};
  const json smollm_pre = json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Digits", "individual_digits": true},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]})");

  // Qwen3's tokenizer.json, its vocabulary cut to 600 tokens.
  const fs::path qwen = g_testdata / "tokenizers" / "qwen3" / "tokenizer.json";
  if (fs::exists(qwen)) {
    const json full = json::parse(read_file(qwen.string()));
    std::vector<std::string> tokens(full["model"]["vocab"].size());
    for (const auto& [tok, id] : full["model"]["vocab"].items()) tokens.at(id.get<size_t>()) = tok;
    std::vector<std::pair<std::string, std::string>> merges;
    for (const auto& m : full["model"]["merges"]) merges.emplace_back(m[0], m[1]);
    Vocab v = shrink(tokens, merges, full["added_tokens"], 600);
    json t = full;
    const json small = tokenizer_json(v, nfc, qwen_pre, true);
    t["model"]["vocab"] = small["model"]["vocab"];
    t["model"]["merges"] = small["model"]["merges"];
    t["added_tokens"] = v.added;
    seed("tokenizer_json", "qwen3_small.json", t.dump(1));
  } else {
    missing(qwen.string());
  }
  // GPT-2's original files as a tokenizer.json (ByteLevel with its regex).
  const fs::path gpt2 = g_testdata / "tokenizers" / "gpt2";
  if (fs::exists(gpt2 / "encoder.json")) {
    const json enc = json::parse(read_file((gpt2 / "encoder.json").string()));
    std::vector<std::string> tokens(enc.size());
    for (const auto& [tok, id] : enc.items()) tokens.at(id.get<size_t>()) = tok;
    std::vector<std::pair<std::string, std::string>> merges;
    std::ifstream bpe(gpt2 / "vocab.bpe");
    std::string line;
    while (std::getline(bpe, line)) {
      const size_t sp = line.find(' ');
      if (line.rfind("#version", 0) == 0 || sp == std::string::npos) continue;
      merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    }
    Vocab v = shrink(tokens, merges, json::array({added_token("<|endoftext|>", true)}), 700);
    seed("tokenizer_json", "gpt2_small.json", tokenizer_json(v, nullptr, gpt2_pre, false).dump());
  } else {
    missing((gpt2 / "encoder.json").string());
  }
  // SmolLM2's vocabulary (from its GGUF) as tokenizer.json: Digits + ByteLevel.
  const std::string smol = smollm2_gguf();
  if (!smol.empty()) {
    const auto f = tessera::nn::GgufFile::open(smol);
    std::vector<std::pair<std::string, std::string>> merges;
    for (const auto& m : f.get_string_array("tokenizer.ggml.merges")) {
      const size_t sp = m.find(' ');
      merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
    const auto tokens = f.get_string_array("tokenizer.ggml.tokens");
    json added = json::array();
    const auto types = f.get_int_array("tokenizer.ggml.token_type");
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] == 3) added.push_back(added_token(tokens[i], true));
    }
    Vocab v = shrink(tokens, merges, added, 500);
    seed("tokenizer_json", "smollm2_small.json",
         tokenizer_json(v, nullptr, smollm_pre, false).dump());
  } else {
    missing("SmolLM2 GGUF (scripts/install-deps.sh)");
  }
  // Made-up: byte symbols and a few merges, Llama 3 split, unk token.
  Vocab tiny;
  tiny.tokens = byte_symbols();
  for (const auto& [a, b] : std::vector<std::pair<std::string, std::string>>{
           {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "t"}}) {
    tiny.tokens.push_back(a + b);
    tiny.merges.emplace_back(a, b);
  }
  tiny.added = {added_token("<s>", true), added_token("<think>", false)};
  for (size_t i = 0; i < tiny.added.size(); ++i) tiny.added[i]["id"] = tiny.tokens.size() + i;
  json llama3 = tokenizer_json(tiny, json::parse(R"({"type": "Sequence", "normalizers": []})"),
                               json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})"),
                               false);
  llama3["model"]["ignore_merges"] = true;
  seed("tokenizer_json", "tiny_llama3.json", llama3.dump(2));
  tiny.added[0]["lstrip"] = true;
  json with_unk = tokenizer_json(tiny, nullptr, gpt2_pre, true);
  with_unk["model"]["unk_token"] = "<s>";
  seed("tokenizer_json", "tiny_unk_lstrip.json", with_unk.dump());

  // Texts for tokenizer_encode: selector byte (tokenizer, parse_special), text.
  std::vector<std::string> texts = {"",
                                    "Hello, world! It's 3.14159.\n\n",
                                    "<|im_start|>user\nHi!<|im_end|>\n",
                                    "<|endoftext|>a<|endoftext|>",
                                    "  \t\r\n  trailing  ",
                                    "e\xcc\x81 \xef\xac\x81 \xe2\x84\xab",
                                    std::string("\xff\xfe\xc3\x28\0\x80", 6),
                                    "1234567890 12,345.67"};
  const fs::path plans = g_testdata / "tokenizers" / "tiktoken" / "TestPlans.txt";
  if (fs::exists(plans)) {
    std::ifstream in(plans);
    std::string line;
    while (std::getline(in, line) && texts.size() < 60) {
      if (line.rfind("Sample: ", 0) == 0 && line.size() > 8) texts.push_back(line.substr(8));
    }
  } else {
    missing(plans.string());
  }
  const fs::path moby = g_testdata / "text" / "moby-dick.txt";
  if (fs::exists(moby)) {
    const std::string book = read_file(moby.string());
    for (size_t off : {size_t{2000}, size_t{400000}, size_t{900000}})
      texts.push_back(book.substr(off, 600));
  }
  const fs::path gsm = g_testdata / "yue-benchmark" / "Yue-GSM8K" / "Yue-GSM8K.json";
  if (fs::exists(gsm)) {
    const json docs = json::parse(read_file(gsm.string()));
    for (size_t i = 0; i < 4 && i < docs.size(); ++i)
      texts.push_back(docs[i]["question"].get<std::string>());
  }
  for (size_t i = 0; i < texts.size(); ++i) {
    seed("tokenizer_encode", "text" + std::to_string(i),
         std::string(1, static_cast<char>(i % 8)) + texts[i]);
  }
}

void safetensors_seeds() {
  using tessera::nn::save_safetensors;
  const fs::path tmp = g_out / ".tmp";
  fs::create_directories(tmp);
  const std::string p = (tmp / "x.safetensors").string();
  save_safetensors(p,
                   {{"f64", at::linspace(-2, 2, 6, at::kDouble).reshape({2, 3})},
                    {"f32", at::arange(8, at::kFloat)},
                    {"f16", at::ones({3}, at::kHalf)},
                    {"bf16", at::full({2, 2}, 0.5, at::kBFloat16)},
                    {"i64", at::tensor({-1, 2}, at::kLong)},
                    {"i32", at::tensor({7}, at::kInt)},
                    {"i16", at::tensor({1, 2, 3}, at::kShort)},
                    {"i8", at::tensor({-3}, at::kChar)},
                    {"u8", at::tensor({255}, at::kByte)},
                    {"bool", at::tensor({1, 0}).to(at::kBool)}},
                   {{"format", "pt"}, {"note", "every dtype"}});
  seed("safetensors", "every_dtype.safetensors", read_file(p));
  save_safetensors(p, {{"scalar", at::scalar_tensor(3.5)}, {"empty", at::zeros({0, 4})}});
  seed("safetensors", "scalar_and_empty.safetensors", read_file(p));
  save_safetensors(p, {});
  seed("safetensors", "no_tensors.safetensors", read_file(p));
  // A real adapter file (save_adapter) of the fuzz fixture's model.
  const auto base = tessera::fuzz::lora_base_model();
  tessera::fuzz::save_fixture_adapters(base, (tmp / "adapters").string());
  seed("safetensors", "lora_adapter.safetensors",
       read_file((tmp / "adapters" / "lora" / "adapter_model.safetensors").string()));
  seed("lora_adapter_config", "lora.json",
       read_file((tmp / "adapters" / "lora" / "adapter_config.json").string()));
  seed("lora_adapter_config", "mos.json",
       read_file((tmp / "adapters" / "mos" / "adapter_config.json").string()));
  seed(
      "lora_adapter_config", "peft_minimal.json",
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "q_proj", "use_dora": false})");
}

// A GGUF llama model: 2 layers, hidden 32 (4 heads, 2 kv), the given
// vocabulary, weights in several storage types.
void write_tiny_llama(const std::string& path, const std::vector<std::string>& tokens,
                      const std::vector<std::string>& merges, const std::vector<int32_t>& types) {
  using tessera::nn::GgmlType;
  tessera::nn::GgufWriter w;
  const int64_t h = 32, inter = 64, vocab = static_cast<int64_t>(tokens.size());
  w.add_string("general.architecture", "llama");
  w.add_string("general.name", "tiny");
  w.add_uint32("llama.block_count", 2);
  w.add_uint32("llama.embedding_length", h);
  w.add_uint32("llama.feed_forward_length", inter);
  w.add_uint32("llama.attention.head_count", 4);
  w.add_uint32("llama.attention.head_count_kv", 2);
  w.add_uint32("llama.context_length", 128);
  w.add_uint32("llama.rope.dimension_count", 8);
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_float32("llama.rope.freq_base", 10000.0f);
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", "smollm");
  w.add_array("tokenizer.ggml.tokens", tokens);
  w.add_array("tokenizer.ggml.merges", merges);
  w.add_array("tokenizer.ggml.token_type", types);
  w.add_uint32("tokenizer.ggml.bos_token_id", 0);
  w.add_uint32("tokenizer.ggml.eos_token_id", 0);
  w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}");
  at::manual_seed(0);
  w.add_tensor("token_embd.weight", at::randn({vocab, h}), GgmlType::kF16);
  w.add_tensor("output_norm.weight", at::ones({h}), GgmlType::kF32);
  for (int l = 0; l < 2; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".";
    w.add_tensor(b + "attn_norm.weight", at::ones({h}), GgmlType::kF32);
    w.add_tensor(b + "ffn_norm.weight", at::ones({h}), GgmlType::kF32);
    w.add_tensor(b + "attn_q.weight", at::randn({h, h}), GgmlType::kQ4_1);
    w.add_tensor(b + "attn_k.weight", at::randn({16, h}), GgmlType::kQ4_0);
    w.add_tensor(b + "attn_v.weight", at::randn({16, h}), GgmlType::kQ8_0);
    w.add_tensor(b + "attn_output.weight", at::randn({h, h}), GgmlType::kBF16);
    w.add_tensor(b + "ffn_gate.weight", at::randn({inter, h}), GgmlType::kQ8_0);
    w.add_tensor(b + "ffn_up.weight", at::randn({inter, h}), GgmlType::kF16);
    w.add_tensor(b + "ffn_down.weight", at::randn({h, inter}), GgmlType::kQ4_1);
  }
  w.write(path);
}

void gguf_seeds() {
  using tessera::nn::GgmlType;
  const std::string p = (g_out / ".tmp" / "x.gguf").string();
  // Every metadata type and every tensor type, default and custom alignment.
  for (uint32_t alignment : {32u, 64u}) {
    tessera::nn::GgufWriter w(alignment);
    w.add_uint8("u8", 200);
    w.add_int8("i8", -100);
    w.add_uint16("u16", 60000);
    w.add_int16("i16", -30000);
    w.add_uint32("u32", 4000000000u);
    w.add_int32("i32", -2000000000);
    w.add_uint64("u64", uint64_t{1} << 63);
    w.add_int64("i64", -(int64_t{1} << 62));
    w.add_float32("f32", 0.25f);
    w.add_float64("f64", -1e300);
    w.add_bool("b", true);
    w.add_string("s", "caf\xc3\xa9");
    w.add_array("a_u8", std::vector<uint8_t>{1, 2});
    w.add_array("a_i32", std::vector<int32_t>{-1, 0, 1});
    w.add_array("a_u64", std::vector<uint64_t>{uint64_t{1} << 63});
    w.add_array("a_f32", std::vector<float>{1.5f});
    w.add_array("a_f64", std::vector<double>{});
    w.add_array("a_bool", std::vector<bool>{true, false, true});
    w.add_array("a_str", std::vector<std::string>{"a", "", "\xe4\xbd\xa0"});
    at::manual_seed(1);
    w.add_tensor("f32", at::randn({2, 32}), GgmlType::kF32);
    w.add_tensor("f16", at::randn({3}), GgmlType::kF16);
    w.add_tensor("bf16", at::randn({1, 2, 2, 2}), GgmlType::kBF16);
    w.add_tensor("q8_0", at::randn({2, 32}), GgmlType::kQ8_0);
    w.add_tensor("q4_0", at::randn({64}), GgmlType::kQ4_0);
    w.add_tensor("q4_1", at::randn({1, 32}), GgmlType::kQ4_1);
    w.write(p);
    seed("gguf", "every_type_align" + std::to_string(alignment) + ".gguf", read_file(p));
  }
  // A complete small llama model with a byte-level vocabulary: from
  // SmolLM2's first 400 tokens when the real file is here, else made up.
  std::vector<std::string> tokens = byte_symbols(), merges;
  std::vector<int32_t> types(tokens.size(), 1);
  tokens.insert(tokens.begin(), "<|endoftext|>");
  types.insert(types.begin(), 3);
  const std::string smol = smollm2_gguf();
  if (!smol.empty()) {
    const auto f = tessera::nn::GgufFile::open(smol);
    std::vector<std::pair<std::string, std::string>> all_merges;
    for (const auto& m : f.get_string_array("tokenizer.ggml.merges")) {
      const size_t sp = m.find(' ');
      all_merges.emplace_back(m.substr(0, sp), m.substr(sp + 1));
    }
    Vocab v = shrink(f.get_string_array("tokenizer.ggml.tokens"), all_merges, json::array(), 400);
    const auto real_types = f.get_int_array("tokenizer.ggml.token_type");
    tokens = v.tokens;
    types.assign(tokens.size(), 1);
    // Ids below 400 kept their place (shrink keeps them in order).
    for (size_t i = 0; i < 400 && i < types.size() && i < real_types.size(); ++i) {
      types[i] = static_cast<int32_t>(real_types[i]);
    }
    merges.clear();
    for (const auto& [a, b] : v.merges) merges.push_back(a + " " + b);
    // The real model's own header: every key of SmolLM2 with its
    // vocabulary arrays cut to the same 400 tokens, and its smallest tensors.
    tessera::nn::GgufWriter w;
    for (const std::string& key : f.keys()) {
      if (key == "general.alignment") continue;
      switch (f.type(key)) {
        case tessera::nn::GgufType::kString:
          w.add_string(key, f.get_string(key));
          break;
        case tessera::nn::GgufType::kFloat32:
          w.add_float32(key, static_cast<float>(f.get_float(key)));
          break;
        case tessera::nn::GgufType::kFloat64:
          w.add_float64(key, f.get_float(key));
          break;
        case tessera::nn::GgufType::kBool:
          w.add_bool(key, f.get_bool(key));
          break;
        case tessera::nn::GgufType::kUint32:
          w.add_uint32(key, static_cast<uint32_t>(f.get_int(key)));
          break;
        case tessera::nn::GgufType::kArray:
          if (key == "tokenizer.ggml.tokens") w.add_array(key, tokens);
          if (key == "tokenizer.ggml.merges") w.add_array(key, merges);
          if (key == "tokenizer.ggml.token_type") w.add_array(key, types);
          break;
        default:
          w.add_int64(key, f.get_int(key));
      }
    }
    int norms = 0;
    for (const auto& info : f.tensors()) {
      if (info.shape.size() == 1 && norms++ < 3)
        w.add_tensor(info.name, f.load(info.name), GgmlType::kF32);
    }
    w.write(p);
    seed("gguf", "smollm2_header.gguf", read_file(p));
  } else {
    missing("SmolLM2 GGUF (scripts/install-deps.sh)");
    merges = {"\xc4\xa0 t", "h e", "\xc4\xa0t he"};
    for (const char* t : {"\xc4\xa0t", "he", "\xc4\xa0the"}) {
      tokens.push_back(t);
      types.push_back(1);
    }
  }
  write_tiny_llama(p, tokens, merges, types);
  seed("gguf", "tiny_llama.gguf", read_file(p));
}

void model_config_seeds() {
  using tessera::nn::ModelConfig;
  using tessera::nn::RopeScaling;
  ModelConfig llama;
  llama.vocab_size = 128256;
  llama.hidden_size = 4096;
  llama.intermediate_size = 14336;
  llama.num_key_value_heads = 8;
  llama.max_position_embeddings = 131072;
  llama.rope_theta = 500000;
  llama.rope_scaling = RopeScaling::kLlama3;
  llama.rope_factor = 8;
  llama.bos_token_id = 128000;
  llama.eos_token_ids = {128001, 128008, 128009};
  seed("model_config", "llama3.json", llama.to_json());
  ModelConfig qwen2;
  qwen2.model_type = "qwen2";
  qwen2.attention_bias = true;
  qwen2.vocab_size = 151936;
  qwen2.hidden_size = 896;
  qwen2.intermediate_size = 4864;
  qwen2.num_hidden_layers = 24;
  qwen2.num_attention_heads = 14;
  qwen2.num_key_value_heads = 2;
  qwen2.tie_word_embeddings = true;
  qwen2.rope_scaling = RopeScaling::kLinear;
  qwen2.rope_factor = 2;
  seed("model_config", "qwen2.json", qwen2.to_json());
  ModelConfig mixtral;
  mixtral.model_type = "mixtral";
  mixtral.num_key_value_heads = 8;
  mixtral.intermediate_size = 14336;
  mixtral.num_experts = 8;
  mixtral.num_experts_per_tok = 2;
  mixtral.router_aux_loss_coef = 0.02;
  seed("model_config", "mixtral.json", mixtral.to_json());
  ModelConfig qwen_moe = qwen2;
  qwen_moe.model_type = "qwen2_moe";
  qwen_moe.rope_scaling = RopeScaling::kNone;
  qwen_moe.num_experts = 60;
  qwen_moe.num_experts_per_tok = 4;
  qwen_moe.moe_intermediate_size = 1408;
  qwen_moe.shared_expert_intermediate_size = 5632;
  qwen_moe.decoder_sparse_step = 2;
  qwen_moe.mlp_only_layers = {0, 3};
  qwen_moe.capacity_factor = 1.25;
  seed("model_config", "qwen2_moe.json", qwen_moe.to_json());
  const std::string smol = smollm2_gguf();
  if (!smol.empty()) {
    // The real model's configuration, as read from its GGUF file, in
    // Hugging Face's fields, with the bookkeeping fields config.json files carry.
    json j = json::parse(tessera::nn::read_gguf_model(smol).config.to_json());
    j["architectures"] = {"LlamaForCausalLM"};
    j["torch_dtype"] = "bfloat16";
    j["transformers_version"] = "4.42.3";
    j["use_cache"] = true;
    seed("model_config", "smollm2.json", j.dump(2));
  } else {
    missing("SmolLM2 GGUF (scripts/install-deps.sh)");
  }
}

void ckpt_seeds() {
  // The checkpoint the fuzz target loads.
  const fs::path dir = g_out / ".tmp" / "ckpt";
  tessera::fuzz::save_fixture_checkpoint(dir.string());
  const std::string text = read_file((dir / tessera::ckpt::kMetadataFile).string());
  seed("ckpt_metadata", "saved.json", text);
  seed("ckpt_metadata", "saved_indented.json", json::parse(text).dump(2));
}

void json_file_seeds() {
  const fs::path prices = g_src / "data" / "aws_lambda_prices.json";
  seed("moe_price_sheet", "aws_lambda_prices.json", read_file(prices.string()));
  seed("moe_price_sheet", "minimal.json",
       R"({"name": "x", "gb_second": 1e-5, "per_request": 0, "memory_sizes_mb": [128, 10240]})");
  seed("sim_cluster", "a100_ib.json",
       read_file((g_src / "data" / "sim" / "a100_ib.json").string()));
  for (const auto& dir : fs::directory_iterator(g_src / "data" / "eval" / "tasks")) {
    for (const auto& f : fs::directory_iterator(dir.path()))
      seed("eval_task", f.path().filename().string(), read_file(f.path().string()));
  }
  // Traces: the example of trace.h (4 ranks, dp 2 x tp 2) and a pipeline of
  // point-to-point transfers with a broadcast.
  seed("sim_trace", "dp_tp.json", R"({
  "schema": "tessera.sim.trace/1",
  "metadata": {"world_size": 4, "layout": {"dp": 2, "tp": 2}, "model": "llama-1b",
               "memory_capacity_bytes": 42949672960,
               "groups": {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]]}},
  "ranks": [
    {"ranks": [0, 1, 2, 3], "peak_memory_bytes": 1073741824,
     "nodes": [
       {"id": 0, "kind": "compute", "name": "layer0.fwd", "duration_us": 120.5,
        "compute_kind": "gemm", "flops": 2.1e9, "call_site": "model.cpp:88"},
       {"id": 1, "kind": "collective", "name": "tp.ar", "op": "all_reduce",
        "group": "tp", "bytes": 4194304, "dtype": "bf16", "deps": [0]},
       {"id": 2, "kind": "compute", "name": "layer0.bwd", "duration_us": 240, "deps": [1]},
       {"id": 3, "kind": "collective", "name": "dp.grads", "op": "reduce_scatter", "group": "dp",
        "bytes": 8388608, "stream": "grads", "deps": [2]},
       {"id": 4, "kind": "compute", "name": "optim", "duration_us": 30, "compute_kind": "elementwise",
        "deps": [3]}]}]})");
  seed("sim_trace", "pipeline.json", R"({
  "schema": "tessera.sim.trace/1",
  "metadata": {"world_size": 2},
  "ranks": [
    {"ranks": [0], "nodes": [
       {"id": 0, "kind": "compute", "name": "stage0", "duration_us": 50},
       {"id": 1, "kind": "p2p_send", "name": "act", "peer": 1, "bytes": 65536, "deps": [0]},
       {"id": 2, "kind": "p2p_recv", "name": "grad", "peer_offset": 1, "bytes": 65536, "tag": 1},
       {"id": 3, "kind": "collective", "name": "bcast", "op": "broadcast", "group": [0, 1],
        "bytes": 1024, "root_index": 0, "deps": [2]},
       {"id": 4, "kind": "collective", "name": "a2a", "op": "all_to_all", "group": [0, 1], "bytes": 4096}]},
    {"ranks": [1], "nodes": [
       {"id": 0, "kind": "p2p_recv", "name": "act", "peer": 0, "bytes": 65536},
       {"id": 1, "kind": "compute", "name": "stage1", "duration_us": 70, "deps": [0]},
       {"id": 2, "kind": "p2p_send", "name": "grad", "peer_offset": -1, "bytes": 65536, "tag": 1, "deps": [1]},
       {"id": 3, "kind": "collective", "name": "bcast", "op": "broadcast", "group": [0, 1],
        "bytes": 1024, "root_index": 0},
       {"id": 4, "kind": "collective", "name": "a2a", "op": "all_to_all", "group": [0, 1], "bytes": 4096,
        "deps": [3]}]}]})");
}

std::string serialized(const google::protobuf::Message& m) {
  std::string s;
  m.SerializeToString(&s);
  return s;
}

void rpc_seeds() {
  int i = 0;
  for (const at::Tensor& t :
       {at::arange(6, at::kFloat).reshape({2, 3}), at::tensor({1, -2}, at::kLong),
        at::ones({2, 1, 2}, at::kBFloat16), at::tensor({1}).to(at::kBool),
        at::zeros({0, 5}, at::kHalf), at::scalar_tensor(2.5, at::kDouble),
        at::tensor({1, 2, 3}, at::kInt), at::tensor({-1}, at::kChar), at::tensor({9}, at::kByte),
        at::tensor({3}, at::kShort)}) {
    tessera::rpc::TensorProto p;
    tessera::rpc::to_proto(t, "t" + std::to_string(i), &p);
    seed("rpc_tensor_proto", "tensor" + std::to_string(i++), serialized(p));
  }

  // rlhf worker requests: a selector byte (0 Call, 1 Fetch, 2 Release), then
  // the message. The worker holds batch "b" (x: float32 [4, 3], id: int64
  // [4]); process 1 published a batch "b" too.
  namespace rp = tessera::rlhf::proto;
  auto call = [](const std::string& method, const std::string& args) {
    rp::CallRequest r;
    r.set_seq(1);
    r.set_role("echo");
    r.set_method(method);
    r.set_args_json(args);
    return r;
  };
  auto add_part = [](rp::InputRef* in, int process, int64_t offset, int64_t rows) {
    auto* part = in->add_parts();
    part->set_process(process);
    part->set_offset(offset);
    part->set_rows(rows);
    return part;
  };
  std::vector<std::pair<std::string, rp::CallRequest>> calls;
  {
    auto r = call("echo", R"({"scale": 2.0})");
    auto* in = r.add_inputs();
    in->set_batch("b");
    add_part(in, 0, 1, 2);
    add_part(in, 1, 0, 3);
    in->set_repeat_last(2);
    r.set_output("out");
    r.set_publish(true);
    calls.emplace_back("call_local_remote", r);
  }
  {
    auto r = call("echo", "");
    auto* in = r.add_inputs();
    in->set_batch("prompts");
    auto* part = add_part(in, -1, 0, 2);
    tessera::rpc::to_proto(at::ones({2, 5}, at::kLong), "input_ids", part->add_inline_rows());
    tessera::rpc::to_proto(at::ones({2, 5}, at::kFloat), "mask", part->add_inline_rows());
    r.set_output("gen");
    calls.emplace_back("call_inline", r);
  }
  {
    auto r = call("stats", "{}");
    auto* in = r.add_inputs();
    in->set_batch("b");
    add_part(in, 0, 0, 4);
    calls.emplace_back("call_stats", r);
  }
  calls.emplace_back("call_bad_seq", call("echo", "{\"unknown\": 1}"));
  calls.back().second.set_seq(0);
  for (const auto& [name, r] : calls)
    seed("rlhf_worker_request", name, std::string(1, '\0') + serialized(r));
  rp::FetchRequest fetch;
  fetch.set_batch("b");
  fetch.set_offset(1);
  fetch.set_rows(3);
  seed("rlhf_worker_request", "fetch", std::string(1, '\1') + serialized(fetch));
  rp::ReleaseRequest release;
  release.set_prefix("b");
  seed("rlhf_worker_request", "release", std::string(1, '\2') + serialized(release));

  // moe function requests: direct tokens, and storage keys k0..k3.
  namespace mp = tessera::moe::proto;
  mp::InvokeRequest direct;
  direct.set_request_id(7);
  tessera::rpc::to_proto(at::randn({5, 8}), "x", direct.mutable_tokens());
  seed("moe_function_request", "direct", serialized(direct));
  mp::InvokeRequest wrong = direct;
  tessera::rpc::to_proto(at::randn({5, 7}), "x", wrong.mutable_tokens());
  seed("moe_function_request", "direct_wrong_width", serialized(wrong));
  mp::InvokeRequest big = direct;
  tessera::rpc::to_proto(at::zeros({4000, 8}), "x", big.mutable_tokens());
  seed("moe_function_request", "direct_over_memory", serialized(big));
  for (const std::vector<std::string>& keys : std::vector<std::vector<std::string>>{
           {"k0"}, {"k0", "k0", "k0"}, {"k1"}, {"k2"}, {"k3", "k0"}}) {
    mp::InvokeRequest r;
    r.set_request_id(9);
    r.set_wait_seconds(0.5);
    std::string name = "keys";
    for (const auto& k : keys) {
      r.add_input_keys(k);
      name += "_" + k;
    }
    seed("moe_function_request", name, serialized(r));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::printf(
        "usage: make_seed_corpus OUT_DIR\n"
        "Writes the seed corpus of every fuzz target into OUT_DIR/<target>/.\n");
    return argc == 2 ? 0 : 2;
  }
  g_out = argv[1];
  try {
    fs::create_directories(g_out / ".tmp");
    tokenizer_seeds();
    safetensors_seeds();
    gguf_seeds();
    model_config_seeds();
    ckpt_seeds();
    json_file_seeds();
    rpc_seeds();
    fs::remove_all(g_out / ".tmp");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_seed_corpus: %s\n", e.what());
    return 1;
  }
  for (const auto& dir : fs::directory_iterator(g_out)) {
    size_t n = 0;
    for ([[maybe_unused]] const auto& f : fs::directory_iterator(dir.path())) ++n;
    std::printf("%-22s %zu seeds\n", dir.path().filename().string().c_str(), n);
  }
  return 0;
}
