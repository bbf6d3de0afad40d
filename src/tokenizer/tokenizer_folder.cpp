// write_tokenizer_folder: a TokenizerSpec as Hugging Face's tokenizer.json
// and tokenizer_config.json (the form from_tokenizer_json reads).
#include <filesystem>
#include <nlohmann/json.hpp>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"
#include "tessera/tokenizer/tokenizer_folder.h"

namespace tessera::nn {
namespace {

using json = nlohmann::json;

void write_text(const std::filesystem::path& path, const std::string& text) {
  AtomicFileWriter writer(path.string());
  writer.append(text.data(), text.size());
  writer.commit();
}

// ByteLevel as both pre-tokenizer (GPT-2's regex) and decoder.
json byte_level() {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", true},
          {"use_regex", true}};
}

}  // namespace

void write_tokenizer_folder(const std::string& dir, const TokenizerSpec& spec,
                            const std::string& chat_template) {
  const std::string where = "write_tokenizer_folder(" + dir + ")";
  TESSERA_CHECK(spec.pre == PreTokenizerKind::kGpt2, InvalidArgument, where,
                ": only the GPT-2 pre-tokenizer (ByteLevel with its regex) is written, not ",
                pre_tokenizer_name(spec.pre));
  TESSERA_CHECK(!spec.unk_id, InvalidArgument, where,
                ": an unk token cannot be expressed in a byte-level tokenizer.json");
  // The same checks as loading: what is written loads back.
  const Tokenizer tokenizer = Tokenizer::from_spec(spec);

  json added = json::array();
  std::vector<bool> is_added(static_cast<size_t>(tokenizer.vocab_size()), false);
  for (const AddedToken& t : spec.added) {
    is_added[static_cast<size_t>(t.id)] = true;
    added.push_back({{"id", t.id},
                     {"content", t.content},
                     {"single_word", false},
                     {"lstrip", t.lstrip},
                     {"rstrip", t.rstrip},
                     {"normalized", false},
                     {"special", t.special}});
  }
  json vocab = json::object();
  for (size_t id = 0; id < spec.vocab.size(); ++id) {
    if (!is_added[id]) vocab[spec.vocab[id]] = id;
  }
  json merges = json::array();
  for (const auto& [a, b] : spec.merges) merges.push_back(json::array({a, b}));
  const json normalizer =
      spec.normalizer == NormalizerKind::kNfc ? json{{"type", "NFC"}} : json(nullptr);
  const json file = {{"version", "1.0"},
                     {"truncation", nullptr},
                     {"padding", nullptr},
                     {"added_tokens", added},
                     {"normalizer", normalizer},
                     {"pre_tokenizer", byte_level()},
                     {"post_processor", nullptr},
                     {"decoder", byte_level()},
                     {"model",
                      {{"type", "BPE"},
                       {"dropout", nullptr},
                       {"unk_token", nullptr},
                       {"continuing_subword_prefix", nullptr},
                       {"end_of_word_suffix", nullptr},
                       {"fuse_unk", false},
                       {"byte_fallback", false},
                       {"ignore_merges", spec.ignore_merges},
                       {"vocab", vocab},
                       {"merges", merges}}}};

  json config = {{"tokenizer_class", "PreTrainedTokenizerFast"}, {"add_bos_token", false}};
  const auto name = [&](std::optional<int32_t> id) { return tokenizer.id_to_token(*id); };
  if (spec.bos_id) config["bos_token"] = name(spec.bos_id);
  if (spec.eos_id) config["eos_token"] = name(spec.eos_id);
  if (spec.pad_id) config["pad_token"] = name(spec.pad_id);
  if (!chat_template.empty()) config["chat_template"] = chat_template;

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  TESSERA_CHECK(!ec, InvalidArgument, where, ": cannot create the folder: ", ec.message());
  write_text(std::filesystem::path(dir) / "tokenizer.json", file.dump(1));
  write_text(std::filesystem::path(dir) / "tokenizer_config.json", config.dump(1));
}

}  // namespace tessera::nn
