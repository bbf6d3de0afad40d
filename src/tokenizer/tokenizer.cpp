#include "tessera/tokenizer/tokenizer.h"
#include "tessera/tokenizer/tokenizer_folder.h"

#include <algorithm>
#include <array>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "pre_tokenizer.h"
#include "tessera/core/config.h"
#include "tessera/core/error.h"
#include "unicode.h"

namespace tessera::nn {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------
// GPT-2's byte-to-unicode map: printable Latin-1 bytes stand for themselves,
// the other 68 bytes for U+0100..U+0143 in byte order, so every byte has a
// visible one-character symbol and vocab files stay printable.

struct ByteMap {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<int16_t, 0x144> cp_to_byte{};  // -1 where no byte maps
};

constexpr ByteMap make_byte_map() {
  ByteMap m{};
  for (auto& b : m.cp_to_byte) b = -1;
  char32_t next = 0x100;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    m.byte_to_cp[b] = printable ? char32_t(b) : next++;
    m.cp_to_byte[m.byte_to_cp[b]] = int16_t(b);
  }
  return m;
}
constexpr ByteMap kByteMap = make_byte_map();

// The bytes a vocabulary-form token stands for. A character outside the map
// (only hand-made vocabularies have them) stands for its own UTF-8 bytes.
std::string token_to_bytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  for (size_t pos = 0; pos < token.size();) {
    const unicode::Utf8Char c = unicode::decode_utf8(token, pos);
    if (c.cp < kByteMap.cp_to_byte.size() && kByteMap.cp_to_byte[c.cp] >= 0) {
      out.push_back(char(kByteMap.cp_to_byte[c.cp]));
    } else {
      out.append(token.substr(pos, c.size));
    }
    pos += c.size;
  }
  return out;
}

std::string byte_symbol(uint8_t byte) {
  std::string s;
  unicode::append_utf8(kByteMap.byte_to_cp[byte], s);
  return s;
}

// Printable form of a token for error messages: quoted, control bytes escaped.
std::string quote_token(std::string_view s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7F) {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += char(c);
    }
  }
  return out + "'";
}

// ---------------------------------------------------------------------------
// (left id, right id) -> (rank, merged id), open addressing with linear
// probing over one flat array. BPE asks it for every adjacent pair of every
// word, so it is the hot lookup; a probe is usually one cache line.

class MergeTable {
 public:
  struct Entry {
    int32_t rank;
    int32_t merged;
  };

  void reserve(size_t count) {
    size_t capacity = 16;
    while (capacity < 2 * count) capacity *= 2;
    slots_.assign(capacity, Slot{kEmpty, {0, 0}});
    mask_ = capacity - 1;
  }

  // Returns false, keeping the first entry, when the pair is already there.
  bool insert(int32_t left, int32_t right, Entry entry) {
    const uint64_t key = make_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return false;
      if (slots_[i].key == kEmpty) {
        slots_[i] = Slot{key, entry};
        return true;
      }
    }
  }

  const Entry* find(int32_t left, int32_t right) const {
    const uint64_t key = make_key(left, right);
    for (size_t i = hash(key);; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].entry;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

 private:
  static constexpr uint64_t kEmpty = std::numeric_limits<uint64_t>::max();  // ids are >= 0
  struct Slot {
    uint64_t key;
    Entry entry;
  };
  static uint64_t make_key(int32_t left, int32_t right) {
    return uint64_t(uint32_t(left)) << 32 | uint32_t(right);
  }
  size_t hash(uint64_t key) const { return size_t((key * 0x9E3779B97F4A7C15ull) >> 32) & mask_; }

  std::vector<Slot> slots_{Slot{kEmpty, {0, 0}}};
  size_t mask_ = 0;
};

// Per-call state of encode(): BPE scratch memory, and a cache of the words
// already encoded in this call. Prose repeats words, so the cache more than
// halves the time of long texts; being per call, it needs no lock.
struct EncodeState {
  struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev;
    int32_t next;
  };
  // A pair that may merge: valid while the symbol at `pos` still has id
  // `left` and its right neighbour id `right` (ids only grow longer, so a
  // pair that changed never comes back with the same ids).
  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t left;
    int32_t right;
    int32_t merged;
  };
  // Lowest rank first, leftmost first among equal ranks (GPT-2's order).
  static bool later(const Candidate& a, const Candidate& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.pos > b.pos);
  }
  std::vector<Symbol> symbols;
  std::vector<Candidate> heap;
  std::vector<std::string_view> words;
  // Word -> (offset, count) of its ids in the output. Keys view the caller's
  // text, which outlives the call; words of NFC-normalized copies are not cached.
  std::unordered_map<std::string_view, std::pair<size_t, size_t>> cache;
};

// ---------------------------------------------------------------------------
// Files and JSON.

std::string read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  TESSERA_CHECK(in.good(), NotFound, "cannot open ", what, " '", path, "'");
  std::ostringstream buffer;
  buffer << in.rdbuf();
  TESSERA_CHECK(!in.bad(), DataLoss, "error reading ", what, " '", path, "'");
  return buffer.str();
}

json parse_json(const std::string& text, const std::string& path) {
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    // e.byte is 1-based and points just past the offending character.
    auto [line, column] = line_column(text, e.byte > 0 ? e.byte - 1 : 0);
    std::string what = e.what();
    auto colon = what.find(": ", what.find("parse error"));
    std::string reason = colon == std::string::npos ? what : what.substr(colon + 2);
    TESSERA_THROW(InvalidArgument, path, ": malformed JSON at line ", line, ", column ", column,
                  ": ", reason);
  } catch (const json::out_of_range& e) {
    // A number too large for a double ("1e999"): out_of_range.406.
    TESSERA_THROW(InvalidArgument, path, ": malformed JSON: ", e.what());
  }
}

// Typed access to a JSON document with errors that name the file and the
// value's path inside it ("tokenizer.json: model.vocab must be an object").
class JsonReader {
 public:
  explicit JsonReader(std::string file) : file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& where, const std::string& what) const {
    TESSERA_THROW(InvalidArgument, file_, ": ", where, " ", what);
  }

  const json& member(const json& object, const std::string& where, const char* key) const {
    if (!object.is_object())
      fail(where, std::string("must be an object, got ") + object.type_name());
    auto it = object.find(key);
    if (it == object.end()) fail(join(where, key), "is missing");
    return *it;
  }
  // The member, or null when absent.
  const json& optional_member(const json& object, const char* key) const {
    static const json kNull;  // immutable; returned by reference only
    auto it = object.find(key);
    return it == object.end() ? kNull : *it;
  }
  std::string string(const json& v, const std::string& where) const {
    if (!v.is_string()) fail(where, std::string("must be a string, got ") + v.type_name());
    return v.get<std::string>();
  }
  int32_t id(const json& v, const std::string& where) const {
    if (!v.is_number_integer())
      fail(where, std::string("must be an integer id, got ") + v.type_name());
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) {
      fail(where, "must be a token id in [0, 2^31), got " + std::to_string(id));
    }
    return int32_t(id);
  }
  bool boolean(const json& v, const std::string& where, bool fallback) const {
    if (v.is_null()) return fallback;
    if (!v.is_boolean()) fail(where, std::string("must be true or false, got ") + v.type_name());
    return v.get<bool>();
  }

  static std::string join(const std::string& where, const std::string& key) {
    return where.empty() ? key : where + "." + key;
  }
  static std::string index(const std::string& where, size_t i) {
    return where + "[" + std::to_string(i) + "]";
  }

 private:
  std::string file_;
};

std::string compact(const json& v) {
  std::string s = v.dump();
  return s.size() > 200 ? s.substr(0, 200) + "..." : s;
}

// The regexes of Split pre-tokenizers we implement, as tokenizer.json spells them.
constexpr std::string_view kGpt2Regex =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr std::string_view kLlama3Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr std::string_view kQwen2Regex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Returns use_regex of a ByteLevel pre-tokenizer; rejects add_prefix_space,
// which would change the text (Hugging Face's default for it is true).
bool byte_level_use_regex(const JsonReader& r, const json& pt, const std::string& where) {
  if (r.boolean(r.optional_member(pt, "add_prefix_space"), where + ".add_prefix_space", true)) {
    r.fail(where, "ByteLevel with add_prefix_space=true (or unset) is not supported");
  }
  return r.boolean(r.optional_member(pt, "use_regex"), where + ".use_regex", true);
}

PreTokenizerKind parse_pre_tokenizer(const JsonReader& r, const json& pt) {
  const std::string where = "pre_tokenizer";
  auto unsupported = [&]() {
    r.fail(where, compact(pt) +
                      " is not supported (supported: ByteLevel, Split(GPT-2, Llama 3 "
                      "or Qwen2 regex) + ByteLevel, Digits(individual) + ByteLevel)");
  };
  if (pt.is_null()) r.fail(where, "is null: a byte-level BPE tokenizer needs ByteLevel");
  const std::string type = r.string(r.member(pt, where, "type"), where + ".type");
  if (type == "ByteLevel") {
    return byte_level_use_regex(r, pt, where) ? PreTokenizerKind::kGpt2 : PreTokenizerKind::kNone;
  }
  if (type != "Sequence") unsupported();
  const json& list = r.member(pt, where, "pretokenizers");
  if (!list.is_array() || list.empty() || list.size() > 2) unsupported();
  const json& last = list.back();
  if (!last.is_object() || last.value("type", "") != "ByteLevel") unsupported();
  const bool use_regex = byte_level_use_regex(r, last, where + ".pretokenizers[-1]");
  if (list.size() == 1) return use_regex ? PreTokenizerKind::kGpt2 : PreTokenizerKind::kNone;

  const json& first = list.front();
  const std::string first_type = first.is_object() ? first.value("type", "") : "";
  if (first_type == "Digits") {
    if (!use_regex || !r.boolean(r.optional_member(first, "individual_digits"),
                                 where + ".pretokenizers[0].individual_digits", false)) {
      unsupported();
    }
    return PreTokenizerKind::kSmolLM;
  }
  if (first_type != "Split" || use_regex) unsupported();
  const json& pattern = r.optional_member(first, "pattern");
  const json& regex = pattern.is_object() ? r.optional_member(pattern, "Regex") : pattern;
  if (!regex.is_string() || r.optional_member(first, "behavior") != "Isolated" ||
      r.boolean(r.optional_member(first, "invert"), where + ".pretokenizers[0].invert", false)) {
    unsupported();
  }
  const std::string re = regex.get<std::string>();
  if (re == kGpt2Regex) return PreTokenizerKind::kGpt2;
  if (re == kLlama3Regex) return PreTokenizerKind::kLlama3;
  if (re == kQwen2Regex) return PreTokenizerKind::kQwen2;
  r.fail(where, "Split regex " + quote_token(re) + " is not supported");
}

NormalizerKind parse_normalizer(const JsonReader& r, const json& n) {
  if (n.is_null()) return NormalizerKind::kNone;
  const std::string type = r.string(r.member(n, "normalizer", "type"), "normalizer.type");
  if (type == "NFC") return NormalizerKind::kNfc;
  if (type == "Sequence") {
    const json& list = r.member(n, "normalizer", "normalizers");
    if (list.is_array() && list.empty()) return NormalizerKind::kNone;
    if (list.is_array() && list.size() == 1) return parse_normalizer(r, list[0]);
  }
  r.fail("normalizer", compact(n) + " is not supported (supported: null, NFC)");
}

void check_decoder(const JsonReader& r, const json& d) {
  if (d.is_null()) return;
  const json& type = r.optional_member(d, "type");
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const json& list = r.optional_member(d, "decoders");
    if (list.is_array() && list.size() == 1 && list[0].is_object() &&
        list[0].value("type", "") == "ByteLevel") {
      return;
    }
  }
  r.fail("decoder", compact(d) + " is not supported (supported: ByteLevel, null)");
}

// Reads bos/eos/pad from a tokenizer_config.json: each a string, an
// {"content": ...} object or null.
std::optional<std::string> config_token(const JsonReader& r, const json& config, const char* key) {
  const json& v = r.optional_member(config, key);
  if (v.is_null()) return std::nullopt;
  if (v.is_object()) return r.string(r.member(v, key, "content"), std::string(key) + ".content");
  return r.string(v, key);
}

// The id a token name will have once `spec` is built: added tokens shadow
// vocabulary strings, as in Tokenizer::token_to_id.
std::optional<int32_t> find_in_spec(const TokenizerSpec& spec, const std::string& name) {
  for (const AddedToken& t : spec.added) {
    if (t.content == name) return t.id;
  }
  for (size_t id = 0; id < spec.vocab.size(); ++id) {
    if (spec.vocab[id] == name) return int32_t(id);
  }
  return std::nullopt;
}

bool is_white_space(char32_t cp) {
  return unicode::char_class(cp) == unicode::CharClass::kWhitespace;
}

}  // namespace

// ---------------------------------------------------------------------------

struct Tokenizer::Impl {
  // Per id. tokens: vocabulary form, or an added token's content.
  // pieces: the bytes decode() emits. special: 1 for special added tokens.
  std::vector<std::string> tokens;
  std::vector<std::string> pieces;
  std::vector<uint8_t> special;
  // Keys are views into `tokens` / `pieces`, which never change after build.
  std::unordered_map<std::string_view, int32_t> token_ids;
  std::unordered_map<std::string_view, int32_t> piece_ids;  // only with ignore_merges
  MergeTable merges;
  std::array<int32_t, 256> byte_ids{};  // base symbol id of each byte, -1 if none

  std::vector<AddedToken> added;  // sorted by id
  // Indices into `added` by the first byte of their content, longest first,
  // so that the first match at a position is the longest.
  std::array<std::vector<int32_t>, 256> added_by_first_byte;

  PreTokenizerKind pre = PreTokenizerKind::kGpt2;
  NormalizerKind normalizer = NormalizerKind::kNone;
  bool ignore_merges = false;
  std::optional<int32_t> bos_id, eos_id, pad_id, unk_id;

  static std::shared_ptr<const Impl> build(TokenizerSpec spec, const std::string& source);
  // The steps of build, in order; each throws InvalidArgument naming `source`
  // and the entry at fault.
  //
  // Sorts `added` by id and checks it: ids may overlap the vocabulary or
  // extend it without holes. Returns the total token count.
  static size_t check_added(std::vector<AddedToken>& added, size_t vocab_count,
                            const std::string& source);
  // Sizes the per-id tables for `total` tokens and indexes the vocabulary
  // and the byte symbols.
  void index_vocabulary(size_t vocab_count, size_t total);
  void add_merges(const std::vector<std::pair<std::string, std::string>>& pairs,
                  const std::string& source);
  // Writes the added tokens over their ids (and flags the special ones).
  // InvalidArgument when an added token takes the id of a vocabulary token
  // with other bytes.
  void place_added(const std::vector<AddedToken>& added, size_t vocab_count,
                   const std::string& source);
  // The bytes decode() emits per id, and with ignore_merges their index.
  void build_pieces(const std::vector<AddedToken>& added, size_t vocab_count, size_t total);
  // Keeps `added` and indexes it by first byte, longest first.
  void index_added(std::vector<AddedToken> sorted);
  // Range-checks and keeps the spec's bos, eos, pad and unk ids.
  void set_special_ids(const TokenizerSpec& spec, size_t total, const std::string& source);

  void check_id(int32_t id) const {
    TESSERA_CHECK(id >= 0 && size_t(id) < tokens.size(), InvalidArgument, "token id ", id,
                  " is out of range [0, ", tokens.size(), ")");
  }
  int32_t find_token(std::string_view token) const {
    auto it = token_ids.find(token);
    return it == token_ids.end() ? -1 : it->second;
  }
  // The longest added token matching text at pos, or null.
  const AddedToken* match_added(std::string_view text, size_t pos, bool parse_special) const {
    for (int32_t index : added_by_first_byte[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& t = added[index];
      if (t.special && !parse_special) continue;
      if (text.compare(pos, t.content.size(), t.content) == 0) return &t;
    }
    return nullptr;
  }
  void encode_plain(std::string_view text, std::vector<int32_t>& ids, EncodeState& state) const;
  void encode_word(std::string_view word, std::vector<int32_t>& ids, EncodeState& state) const;
  int32_t byte_id(unsigned char byte) const {
    const int32_t id = byte_ids[byte];
    if (id >= 0) return id;
    TESSERA_CHECK(unk_id.has_value(), InvalidArgument, "byte 0x", std::hex, int(byte),
                  " has no token: its symbol ", quote_token(byte_symbol(byte)),
                  " is not in the vocabulary and no unk_id is set");
    return *unk_id;
  }
};

std::shared_ptr<const Tokenizer::Impl> Tokenizer::Impl::build(TokenizerSpec spec,
                                                              const std::string& source) {
  TESSERA_CHECK(!spec.vocab.empty(), InvalidArgument, source, ": the vocabulary is empty");
  auto impl = std::make_shared<Impl>();
  impl->pre = spec.pre;
  impl->normalizer = spec.normalizer;
  impl->ignore_merges = spec.ignore_merges;
  impl->tokens = std::move(spec.vocab);
  const size_t vocab_count = impl->tokens.size();
  const size_t total = check_added(spec.added, vocab_count, source);
  impl->index_vocabulary(vocab_count, total);
  impl->add_merges(spec.merges, source);
  spec.merges.clear();
  spec.merges.shrink_to_fit();
  impl->place_added(spec.added, vocab_count, source);
  impl->build_pieces(spec.added, vocab_count, total);
  impl->index_added(std::move(spec.added));
  impl->set_special_ids(spec, total, source);
  return impl;
}

size_t Tokenizer::Impl::check_added(std::vector<AddedToken>& added, size_t vocab_count,
                                    const std::string& source) {
  std::sort(added.begin(), added.end(),
            [](const AddedToken& a, const AddedToken& b) { return a.id < b.id; });
  size_t total = vocab_count;
  for (size_t i = 0; i < added.size(); ++i) {
    const AddedToken& t = added[i];
    TESSERA_CHECK(!t.content.empty(), InvalidArgument, source, ": added token ", t.id,
                  " has empty content");
    TESSERA_CHECK(t.id >= 0, InvalidArgument, source, ": added token ", quote_token(t.content),
                  " has negative id ", t.id);
    TESSERA_CHECK(i == 0 || added[i - 1].id != t.id, InvalidArgument, source,
                  ": two added tokens have id ", t.id);
    if (size_t(t.id) >= total) {
      TESSERA_CHECK(size_t(t.id) == total, InvalidArgument, source, ": token id ", total,
                    " is neither in the vocabulary (", vocab_count,
                    " tokens) nor an added token (the next added id is ", t.id, ")");
      total = size_t(t.id) + 1;
    }
  }
  TESSERA_CHECK(total <= size_t(std::numeric_limits<int32_t>::max()), InvalidArgument, source,
                ": too many tokens (", total, ")");
  return total;
}

void Tokenizer::Impl::index_vocabulary(size_t vocab_count, size_t total) {
  // Sized once, before any view into the strings is taken: a reallocation
  // would move short strings, whose bytes live inside the string object.
  tokens.resize(total);
  token_ids.reserve(total);
  for (size_t id = 0; id < vocab_count; ++id) {
    token_ids.emplace(tokens[id], int32_t(id));  // the first of duplicates wins
  }
  for (int b = 0; b < 256; ++b) byte_ids[b] = find_token(byte_symbol(uint8_t(b)));
}

void Tokenizer::Impl::add_merges(const std::vector<std::pair<std::string, std::string>>& pairs,
                                 const std::string& source) {
  merges.reserve(pairs.size());
  std::string joined;
  for (size_t rank = 0; rank < pairs.size(); ++rank) {
    const auto& [left, right] = pairs[rank];
    const int32_t left_id = find_token(left);
    const int32_t right_id = find_token(right);
    joined.assign(left).append(right);
    const int32_t merged_id = find_token(joined);
    const char* missing = left_id < 0 ? "first half" : right_id < 0 ? "second half" : "result";
    TESSERA_CHECK(left_id >= 0 && right_id >= 0 && merged_id >= 0, InvalidArgument, source,
                  ": merge ", rank, " (", quote_token(left), " ", quote_token(right), "): its ",
                  missing, " ",
                  quote_token(left_id < 0    ? left
                              : right_id < 0 ? right
                                             : joined),
                  " is not in the vocabulary");
    merges.insert(left_id, right_id, {int32_t(rank), merged_id});
  }
}

void Tokenizer::Impl::place_added(const std::vector<AddedToken>& added, size_t vocab_count,
                                  const std::string& source) {
  special.assign(tokens.size(), 0);
  for (const AddedToken& t : added) {
    std::string& slot = tokens[t.id];
    // An added token inside the vocabulary names the same token (the same
    // bytes, its string possibly in the byte-level alphabet). Otherwise the
    // id would encode as one token and decode as the other; Hugging Face's
    // loader moves such a token to another id with a warning, so the file's
    // ids are not what it runs with either.
    TESSERA_CHECK(
        size_t(t.id) >= vocab_count || slot == t.content || token_to_bytes(slot) == t.content,
        InvalidArgument, source, ": added token ", quote_token(t.content), " has id ", t.id,
        ", which the vocabulary gives to ", quote_token(slot));
    if (size_t(t.id) < vocab_count && slot != t.content) {
      auto it = token_ids.find(slot);
      if (it != token_ids.end() && it->second == t.id) token_ids.erase(it);
    }
    slot = t.content;
    token_ids[slot] = t.id;  // an added token shadows an equal vocabulary string
    special[t.id] = t.special ? 1 : 0;
  }
}

void Tokenizer::Impl::build_pieces(const std::vector<AddedToken>& added, size_t vocab_count,
                                   size_t total) {
  pieces.resize(total);
  for (size_t id = 0; id < vocab_count; ++id) pieces[id] = token_to_bytes(tokens[id]);
  for (const AddedToken& t : added) pieces[t.id] = t.content;
  if (ignore_merges) {
    std::vector<uint8_t> is_added(total, 0);
    for (const AddedToken& t : added) is_added[t.id] = 1;
    piece_ids.reserve(vocab_count);
    for (size_t id = 0; id < vocab_count; ++id) {
      if (!is_added[id]) piece_ids.emplace(pieces[id], int32_t(id));
    }
  }
}

void Tokenizer::Impl::index_added(std::vector<AddedToken> sorted) {
  added = std::move(sorted);
  for (size_t i = 0; i < added.size(); ++i) {
    auto& bucket = added_by_first_byte[static_cast<unsigned char>(added[i].content[0])];
    bucket.push_back(int32_t(i));
  }
  for (auto& bucket : added_by_first_byte) {
    std::stable_sort(bucket.begin(), bucket.end(), [&](int32_t a, int32_t b) {
      return added[a].content.size() > added[b].content.size();
    });
  }
}

void Tokenizer::Impl::set_special_ids(const TokenizerSpec& spec, size_t total,
                                      const std::string& source) {
  auto check_optional = [&](const std::optional<int32_t>& id, const char* name) {
    TESSERA_CHECK(!id || (*id >= 0 && size_t(*id) < total), InvalidArgument, source, ": ", name,
                  " ", id.value_or(0), " is out of range [0, ", total, ")");
  };
  check_optional(spec.bos_id, "bos_id");
  check_optional(spec.eos_id, "eos_id");
  check_optional(spec.pad_id, "pad_id");
  check_optional(spec.unk_id, "unk_id");
  bos_id = spec.bos_id;
  eos_id = spec.eos_id;
  pad_id = spec.pad_id;
  unk_id = spec.unk_id;
}

void Tokenizer::Impl::encode_word(std::string_view word, std::vector<int32_t>& ids,
                                  EncodeState& state) const {
  if (word.size() == 1) {
    ids.push_back(byte_id(static_cast<unsigned char>(word[0])));
    return;
  }
  if (ignore_merges) {
    auto it = piece_ids.find(word);
    if (it != piece_ids.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  auto& symbols = state.symbols;
  auto& heap = state.heap;
  const int32_t n = int32_t(word.size());
  symbols.resize(word.size());
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = {byte_id(static_cast<unsigned char>(word[i])), i - 1, i + 1 < n ? i + 1 : -1};
  }
  heap.clear();
  auto consider = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    const MergeTable::Entry* e = merges.find(symbols[pos].id, symbols[next].id);
    if (e == nullptr) return;
    heap.push_back({e->rank, pos, symbols[pos].id, symbols[next].id, e->merged});
    std::push_heap(heap.begin(), heap.end(), EncodeState::later);
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), EncodeState::later);
    const EncodeState::Candidate c = heap.back();
    heap.pop_back();
    auto& left = symbols[c.pos];
    if (left.id != c.left || left.next < 0 || symbols[left.next].id != c.right) continue;
    auto& right = symbols[left.next];
    left.id = c.merged;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = c.pos;
    if (left.prev >= 0) consider(left.prev);
    consider(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) ids.push_back(symbols[i].id);
}

void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<int32_t>& ids,
                                   EncodeState& state) const {
  if (text.empty()) return;
  std::string normalized;
  const bool cacheable = normalizer != NormalizerKind::kNfc || unicode::is_nfc_quick(text);
  if (!cacheable) {
    normalized = unicode::to_nfc(text);
    text = normalized;
  }
  state.words.clear();
  detail::split_words(text, pre, state.words);
  for (std::string_view word : state.words) {
    if (!cacheable) {
      encode_word(word, ids, state);
      continue;
    }
    auto [it, fresh] = state.cache.try_emplace(word);
    if (!fresh) {
      const auto [offset, count] = it->second;
      for (size_t k = offset; k < offset + count; ++k) {
        const int32_t id = ids[k];  // a copy: push_back may reallocate
        ids.push_back(id);
      }
      continue;
    }
    const size_t offset = ids.size();
    encode_word(word, ids, state);
    it->second = {offset, ids.size() - offset};
  }
}

// ---------------------------------------------------------------------------

Tokenizer::Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Tokenizer Tokenizer::from_spec(TokenizerSpec spec) {
  return Tokenizer(Impl::build(std::move(spec), "TokenizerSpec"));
}

Tokenizer Tokenizer::bytes(const std::vector<std::string>& specials) {
  TokenizerSpec spec;
  for (int b = 0; b < 256; ++b) spec.vocab.push_back(byte_symbol(static_cast<uint8_t>(b)));
  for (size_t i = 0; i < specials.size(); ++i) {
    AddedToken t;
    t.content = specials[i];
    t.id = static_cast<int32_t>(256 + i);
    t.special = true;
    spec.added.push_back(t);
  }
  spec.pre = PreTokenizerKind::kNone;
  if (!specials.empty()) spec.bos_id = spec.eos_id = 256;
  return from_spec(std::move(spec));
}

Tokenizer Tokenizer::from_gpt2_files(const std::string& encoder_json,
                                     const std::string& vocab_bpe) {
  const json encoder = parse_json(read_file(encoder_json, "GPT-2 encoder.json"), encoder_json);
  const JsonReader r(encoder_json);
  if (!encoder.is_object()) r.fail("the top level", "must be an object of token -> id");
  TokenizerSpec spec;
  spec.pre = PreTokenizerKind::kGpt2;
  spec.vocab.resize(encoder.size());
  std::vector<uint8_t> seen(encoder.size(), 0);
  for (const auto& [token, value] : encoder.items()) {
    const int32_t id = r.id(value, quote_token(token));
    if (size_t(id) >= seen.size() || seen[id]) {
      r.fail(quote_token(token), "has id " + std::to_string(id) + ", but ids must be 0.." +
                                     std::to_string(seen.size() - 1) + ", each used once");
    }
    seen[id] = 1;
    spec.vocab[id] = token;
  }

  const std::string merges = read_file(vocab_bpe, "GPT-2 vocab.bpe");
  std::istringstream lines(merges);
  std::string line;
  for (size_t number = 1; std::getline(lines, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (number == 1 && line.rfind("#version", 0) == 0)) continue;
    const size_t space = line.find(' ');
    TESSERA_CHECK(space != std::string::npos && space > 0 && space + 1 < line.size() &&
                      line.find(' ', space + 1) == std::string::npos,
                  InvalidArgument, vocab_bpe, ": line ", number,
                  ": expected two tokens separated by one space, got ", quote_token(line));
    spec.merges.emplace_back(line.substr(0, space), line.substr(space + 1));
  }

  auto eot = encoder.find("<|endoftext|>");
  if (eot != encoder.end()) {
    const int32_t id = eot->get<int32_t>();
    spec.added.push_back({"<|endoftext|>", id, /*special=*/true});
    spec.bos_id = spec.eos_id = id;
  }
  return Tokenizer(Impl::build(std::move(spec), encoder_json + " + " + vocab_bpe));
}

namespace {

// The steps of Tokenizer::from_tokenizer_json, in order; each fails through
// `r` (InvalidArgument naming the file and the value's path in it).

// The model's options: only plain byte-level BPE is supported.
void check_bpe_options(const JsonReader& r, const json& model, TokenizerSpec& spec) {
  const json& type = r.optional_member(model, "type");
  if (!type.is_null() && type != "BPE") {
    r.fail("model.type", compact(type) + " is not supported; only byte-level BPE is");
  }
  const json& dropout = r.optional_member(model, "dropout");
  if (!dropout.is_null() && !(dropout.is_number() && dropout.get<double>() == 0.0)) {
    r.fail("model.dropout", compact(dropout) + " is not supported (BPE dropout is for training)");
  }
  if (r.boolean(r.optional_member(model, "byte_fallback"), "model.byte_fallback", false)) {
    r.fail("model.byte_fallback", "is true: SentencePiece-style BPE is not supported");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json& v = r.optional_member(model, key);
    if (!v.is_null() && v != "")
      r.fail(std::string("model.") + key, compact(v) + " is not supported");
  }
  spec.ignore_merges =
      r.boolean(r.optional_member(model, "ignore_merges"), "model.ignore_merges", false);
}

// model.vocab: token -> id, the ids 0..n-1 each used once.
void read_vocab(const JsonReader& r, const json& model, TokenizerSpec& spec) {
  const json& vocab = r.member(model, "model", "vocab");
  if (!vocab.is_object()) r.fail("model.vocab", "must be an object of token -> id");
  spec.vocab.resize(vocab.size());
  std::vector<uint8_t> seen(vocab.size(), 0);
  for (const auto& [token, value] : vocab.items()) {
    const std::string where = "model.vocab[" + quote_token(token) + "]";
    const int32_t id = r.id(value, where);
    if (size_t(id) >= seen.size() || seen[id]) {
      r.fail(where, "is " + std::to_string(id) + ", but the ids of model.vocab must be 0.." +
                        std::to_string(seen.size() - 1) + ", each used once");
    }
    seen[id] = 1;
    spec.vocab[id] = token;
  }
}

// model.merges: "a b" strings or ["a", "b"] pairs, best first.
void read_merges(const JsonReader& r, const json& model, TokenizerSpec& spec) {
  const json& merges = r.member(model, "model", "merges");
  if (!merges.is_array()) r.fail("model.merges", "must be an array");
  spec.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    const std::string where = JsonReader::index("model.merges", i);
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        r.fail(where, "must be two tokens separated by one space, got " + quote_token(s));
      }
      spec.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2) {
      spec.merges.emplace_back(r.string(m[0], where + "[0]"), r.string(m[1], where + "[1]"));
    } else {
      r.fail(where, "must be \"a b\" or [\"a\", \"b\"], got " + compact(m));
    }
  }
}

// added_tokens (optional): id, content and flags of each.
void read_added_tokens(const JsonReader& r, const json& root, TokenizerSpec& spec) {
  const json& added = r.optional_member(root, "added_tokens");
  if (!added.is_null() && !added.is_array()) r.fail("added_tokens", "must be an array");
  for (size_t i = 0; i < added.size(); ++i) {
    const json& a = added[i];
    const std::string where = JsonReader::index("added_tokens", i);
    AddedToken t;
    t.id = r.id(r.member(a, where, "id"), where + ".id");
    t.content = r.string(r.member(a, where, "content"), where + ".content");
    t.special = r.boolean(r.optional_member(a, "special"), where + ".special", false);
    t.lstrip = r.boolean(r.optional_member(a, "lstrip"), where + ".lstrip", false);
    t.rstrip = r.boolean(r.optional_member(a, "rstrip"), where + ".rstrip", false);
    if (r.boolean(r.optional_member(a, "single_word"), where + ".single_word", false)) {
      r.fail(where,
             "(" + quote_token(t.content) + ") has single_word=true, which is not supported");
    }
    spec.added.push_back(std::move(t));
  }
}

// The ids of model.unk_token and of the bos, eos and pad tokens that
// tokenizer_config.json beside `path` names (when that file exists).
void resolve_special_tokens(const JsonReader& r, const json& model, const std::string& path,
                            TokenizerSpec& spec) {
  const json& unk = r.optional_member(model, "unk_token");
  std::optional<std::string> unk_token;
  if (!unk.is_null()) unk_token = r.string(unk, "model.unk_token");

  // The special-token names live in tokenizer_config.json beside the file.
  std::optional<std::string> bos, eos, pad;
  const size_t slash = path.find_last_of('/');
  const std::string config_path =
      (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) +
      "tokenizer_config.json";
  if (std::ifstream(config_path).good()) {
    const json config = parse_json(read_file(config_path, "tokenizer config"), config_path);
    const JsonReader cr(config_path);
    if (!config.is_object()) cr.fail("the top level", "must be an object");
    bos = config_token(cr, config, "bos_token");
    eos = config_token(cr, config, "eos_token");
    pad = config_token(cr, config, "pad_token");
  }

  auto resolve = [&](const std::optional<std::string>& name, const char* what,
                     const std::string& file) -> std::optional<int32_t> {
    if (!name) return std::nullopt;
    const std::optional<int32_t> id = find_in_spec(spec, *name);
    TESSERA_CHECK(id.has_value(), InvalidArgument, file, ": ", what, " ", quote_token(*name),
                  " is not a token of ", path);
    return id;
  };
  spec.unk_id = resolve(unk_token, "model.unk_token", path);
  spec.bos_id = resolve(bos, "bos_token", config_path);
  spec.eos_id = resolve(eos, "eos_token", config_path);
  spec.pad_id = resolve(pad, "pad_token", config_path);
}

}  // namespace

Tokenizer Tokenizer::from_tokenizer_json(const std::string& path) {
  const json root = parse_json(read_file(path, "tokenizer file"), path);
  const JsonReader r(path);
  TokenizerSpec spec;
  const json& model = r.member(root, "", "model");
  check_bpe_options(r, model, spec);
  read_vocab(r, model, spec);
  read_merges(r, model, spec);
  spec.normalizer = parse_normalizer(r, r.optional_member(root, "normalizer"));
  spec.pre = parse_pre_tokenizer(r, r.optional_member(root, "pre_tokenizer"));
  check_decoder(r, r.optional_member(root, "decoder"));
  read_added_tokens(r, root, spec);
  resolve_special_tokens(r, model, path, spec);
  return Tokenizer(Impl::build(std::move(spec), path));
}

PreTokenizerKind Tokenizer::pre_tokenizer_from_gguf_name(const std::string& name) {
  // llama.cpp's src/llama-vocab.cpp, grouped by the regexes it uses.
  static const char* const kGpt2Names[] = {
      "",         "default",    "gpt-2",       "phi-2",      "jina-es",      "jina-de",
      "gigachat", "jina-v1-en", "jina-v2-es",  "jina-v2-de", "jina-v2-code", "roberta-bpe",
      "a.x-4.0",  "mellum",     "modern-bert", "exaone4",    "mpt",          "olmo",
      "jais"};
  static const char* const kSmolLMNames[] = {"smollm",    "starcoder", "refact",    "command-r",
                                             "codeshell", "exaone",    "minerva-7b"};
  static const char* const kLlama3Names[] = {
      "llama3", "llama-v3",     "llama-bpe", "falcon3",   "falcon-h1", "pixtral",    "midm-2.0",
      "lfm2",   "jina-v5-nano", "dbrx",      "smaug-bpe", "glm4",      "chatglm-bpe"};
  static const char* const kQwen2Names[] = {"qwen2",   "deepseek-r1-qwen", "kormo",
                                            "f2llmv2", "stablelm2",        "megrez"};
  auto in = [&](const auto& names) {
    return std::find(std::begin(names), std::end(names), name) != std::end(names);
  };
  if (in(kGpt2Names)) return PreTokenizerKind::kGpt2;
  if (in(kSmolLMNames)) return PreTokenizerKind::kSmolLM;
  if (in(kLlama3Names)) return PreTokenizerKind::kLlama3;
  if (in(kQwen2Names)) return PreTokenizerKind::kQwen2;
  TESSERA_THROW(InvalidArgument, "GGUF tokenizer.ggml.pre ", quote_token(name),
                " is not supported (supported: the GPT-2, SmolLM, Llama 3 and Qwen2 families)");
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  const Impl& impl = *impl_;
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  EncodeState state;
  size_t plain_start = 0;
  if (!impl.added.empty()) {
    for (size_t pos = 0; pos < text.size();) {
      const AddedToken* t = impl.match_added(text, pos, parse_special);
      if (t == nullptr) {
        ++pos;
        continue;
      }
      size_t start = pos;
      size_t end = pos + t->content.size();
      if (t->lstrip) {
        while (start > plain_start) {
          size_t prev = start - 1;  // step back to the start of the character
          while (prev > plain_start && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) {
            --prev;
          }
          const unicode::Utf8Char c = unicode::decode_utf8(text, prev);
          if (prev + c.size != start || !is_white_space(c.cp)) break;
          start = prev;
        }
      }
      if (t->rstrip) {
        while (end < text.size()) {
          const unicode::Utf8Char c = unicode::decode_utf8(text, end);
          if (!is_white_space(c.cp)) break;
          end += c.size;
        }
      }
      impl.encode_plain(text.substr(plain_start, start - plain_start), ids, state);
      ids.push_back(t->id);
      pos = plain_start = end;
    }
  }
  impl.encode_plain(text.substr(plain_start), ids, state);
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& impl = *impl_;
  std::string out;
  for (int32_t id : ids) {
    impl.check_id(id);
    if (skip_special && impl.special[id]) continue;
    out += impl.pieces[id];
  }
  return out;
}

std::string Tokenizer::normalize(std::string_view text) const {
  if (impl_->normalizer == NormalizerKind::kNfc && !unicode::is_nfc_quick(text)) {
    return unicode::to_nfc(text);
  }
  return std::string(text);
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  const int32_t id = impl_->find_token(token);
  TESSERA_CHECK(id >= 0, NotFound, "token ", quote_token(token), " is not in the vocabulary");
  return id;
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
  impl_->check_id(id);
  return impl_->tokens[id];
}

int64_t Tokenizer::vocab_size() const { return int64_t(impl_->tokens.size()); }
std::optional<int32_t> Tokenizer::bos_id() const { return impl_->bos_id; }
std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos_id; }
std::optional<int32_t> Tokenizer::pad_id() const { return impl_->pad_id; }

bool Tokenizer::is_special(int32_t id) const {
  impl_->check_id(id);
  return impl_->special[id] != 0;
}

PreTokenizerKind Tokenizer::pre_tokenizer() const { return impl_->pre; }
NormalizerKind Tokenizer::normalizer() const { return impl_->normalizer; }
const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

std::string byte_level_symbol(uint8_t byte) { return byte_symbol(byte); }

}  // namespace tessera::nn
