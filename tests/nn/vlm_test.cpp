// Vision-language models: image files and resizing against PIL, the
// processors' steps against hand-computed values, both checkpoint layouts
// (SmolVLM / Idefics3 and LLaVA-1.5) against an independent PyTorch
// implementation (tests/nn/reference_vlm.py under Debian's python3-torch),
// KV-cache generation with images, and the errors of malformed inputs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tessera/core/error.h"
#include "tessera/core/subprocess.h"
#include "tessera/formats/safetensors.h"
#include "tessera/nn/image.h"
#include "tessera/nn/vlm.h"
#include "test_main.h"

namespace fs = std::filesystem;

namespace tessera::nn {
namespace {

const char* kPython = TESSERA_PYTHON;
const std::string kReference = std::string(TESSERA_SOURCE_DIR) + "/tests/nn/reference_vlm.py";

std::string run(const std::string& cmd) { return run_shell(cmd, std::chrono::minutes(10)).output; }

bool have_reference() {
  return run(std::string(kPython) + " -c 'import torch, PIL, numpy; print(\"ok\")'").find("ok") ==
         0;
}

fs::path scratch(const std::string& name) {
  fs::path p =
      fs::path(::testing::TempDir()) / ("tessera_vlm_" + std::to_string(getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out << bytes;
}

// An image with smooth gradients and hard edges, so that every filter's
// rounding is exercised.
Image test_pattern(int64_t h, int64_t w, int seed) {
  Image img = Image::filled(h, w, 0, 0, 0);
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      uint8_t* p = img.pixel(y, x);
      p[0] = static_cast<uint8_t>((x * 255) / std::max<int64_t>(w - 1, 1));
      p[1] = static_cast<uint8_t>(((x / 3 + y / 5 + seed) % 2) * 200 + 20);
      p[2] = static_cast<uint8_t>((x * 7 + y * 13 + seed * 31) % 256);
    }
  }
  return img;
}

// RGB bytes the reference script wrote (int32 height, width, then bytes).
Image read_reference_rgb(const fs::path& p) {
  std::string bytes = read_file(p);
  EXPECT_GE(bytes.size(), 8u);
  int32_t hw[2];
  std::memcpy(hw, bytes.data(), 8);
  Image img;
  img.height = hw[0];
  img.width = hw[1];
  img.pixels.assign(bytes.begin() + 8, bytes.end());
  return img;
}

template <typename Fn>
void expect_error(Fn&& fn, ErrorCode code, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// --- images -----------------------------------------------------------------

TEST(Image, PngRoundTripAndJpegDecode) {
  Image img = test_pattern(37, 53, 1);
  EXPECT_EQ(decode_image(encode_png(img)), img);
  // JPEG is lossy: a smooth picture comes back within a few levels.
  Image smooth = Image::filled(37, 53, 0, 0, 0);
  for (int64_t y = 0; y < 37; ++y) {
    for (int64_t x = 0; x < 53; ++x) {
      uint8_t* p = smooth.pixel(y, x);
      p[0] = static_cast<uint8_t>(x * 4);
      p[1] = static_cast<uint8_t>(y * 6);
      p[2] = 128;
    }
  }
  Image jpeg = decode_image(encode_jpeg(smooth, 95));
  ASSERT_EQ(jpeg.height, 37);
  ASSERT_EQ(jpeg.width, 53);
  double err = 0;
  for (size_t i = 0; i < smooth.pixels.size(); ++i)
    err += std::abs(int(smooth.pixels[i]) - int(jpeg.pixels[i]));
  EXPECT_LT(err / smooth.pixels.size(), 3.0);
}

TEST(Image, DecodingMatchesPil) {
  TESSERA_REQUIRE_INSTALLED(have_reference(), std::string(kPython) + " with torch and PIL");
  fs::path dir = scratch("decode");
  write_image((dir / "photo.jpg").string(), test_pattern(40, 64, 2));
  // Grey, palette, RGBA with partial alpha, grey + alpha: the
  // conversions the processors' convert_to_rgb makes.
  std::string script =
      "from PIL import Image; import numpy as np; d='" + dir.string() +
      "'\n"
      "a = np.zeros((21, 30, 4), np.uint8)\n"
      "for y in range(21):\n"
      "  for x in range(30): a[y, x] = (x * 8, y * 12, (x * y) % 256, (x * 9 + y * 5) % 256)\n"
      "Image.fromarray(a, 'RGBA').save(d + '/rgba.png')\n"
      "Image.fromarray(a[:, :, 0], 'L').save(d + '/grey.png')\n"
      "Image.fromarray(a[:, :, :3], 'RGB').convert('P', palette=Image.ADAPTIVE, colors=17).save(d "
      "+ '/palette.png')\n"
      "Image.fromarray(a[:, :, :2], 'LA').save(d + '/grey_alpha.png')\n";
  write_file(dir / "make.py", script);
  ASSERT_EQ(run(std::string(kPython) + " " + (dir / "make.py").string()), "");
  for (const char* name : {"photo.jpg", "rgba.png", "grey.png", "palette.png", "grey_alpha.png"}) {
    SCOPED_TRACE(name);
    fs::path out = dir / (std::string(name) + ".bin");
    run(std::string(kPython) + " " + kReference + " decode " + (dir / name).string() + " " +
        out.string());
    Image ref = read_reference_rgb(out);
    Image ours = read_image((dir / name).string());
    ASSERT_EQ(ours.height, ref.height);
    ASSERT_EQ(ours.width, ref.width);
    EXPECT_TRUE(ours.pixels == ref.pixels) << "pixels differ from PIL's";
  }
  fs::remove_all(dir);
}

TEST(Image, MalformedFilesGiveNamedErrors) {
  fs::path dir = scratch("malformed");
  const std::string png = encode_png(test_pattern(30, 30, 3));
  const std::string jpeg = encode_jpeg(test_pattern(30, 30, 3));
  write_file(dir / "cut.png", png.substr(0, png.size() / 2));
  write_file(dir / "cut.jpg", jpeg.substr(0, jpeg.size() / 2));
  std::string flipped = png;
  flipped[png.size() / 2] ^= 0x55;  // corrupt compressed data: the CRC check fails
  write_file(dir / "flipped.png", flipped);
  write_file(dir / "text.png", "this is not an image at all");
  write_file(dir / "empty.jpg", "");
  const std::string p = (dir / "cut.png").string();
  expect_error([&] { read_image(p); }, ErrorCode::kDataLoss, {p, "corrupt PNG"});
  const std::string j = (dir / "cut.jpg").string();
  expect_error([&] { read_image(j); }, ErrorCode::kDataLoss, {j, "JPEG"});
  const std::string f = (dir / "flipped.png").string();
  expect_error([&] { read_image(f); }, ErrorCode::kDataLoss, {f});
  const std::string t = (dir / "text.png").string();
  expect_error([&] { read_image(t); }, ErrorCode::kInvalidArgument, {t, "not a PNG or JPEG"});
  const std::string e = (dir / "empty.jpg").string();
  expect_error([&] { read_image(e); }, ErrorCode::kInvalidArgument, {e, "<empty>"});
  expect_error([&] { read_image((dir / "missing.png").string()); }, ErrorCode::kNotFound,
               {"missing.png"});
  expect_error([&] { write_image((dir / "x.gif").string(), test_pattern(2, 2, 0)); },
               ErrorCode::kInvalidArgument, {"x.gif"});
  fs::remove_all(dir);
}

TEST(Image, ResizeMatchesPilForEveryFilter) {
  TESSERA_REQUIRE_INSTALLED(have_reference(), std::string(kPython) + " with torch and PIL");
  fs::path dir = scratch("resize");
  const Image src = test_pattern(45, 61, 4);
  write_image((dir / "src.png").string(), src);
  const std::vector<std::pair<int64_t, int64_t>> sizes = {
      {16, 16}, {64, 64}, {45, 30}, {100, 23}, {7, 128}};
  for (int r = 0; r <= 5; ++r) {
    for (auto [h, w] : sizes) {
      SCOPED_TRACE(std::string(resample_name(static_cast<Resample>(r))) + " " + std::to_string(h) +
                   "x" + std::to_string(w));
      fs::path out = dir / "out.bin";
      run(std::string(kPython) + " " + kReference + " resize " + (dir / "src.png").string() + " " +
          std::to_string(h) + " " + std::to_string(w) + " " + std::to_string(r) + " " +
          out.string());
      Image ref = read_reference_rgb(out);
      Image ours = resize_image(src, h, w, static_cast<Resample>(r));
      ASSERT_EQ(ref.height, h);
      ASSERT_EQ(ours.width, w);
      int worst = 0;
      for (size_t i = 0; i < ours.pixels.size(); ++i) {
        worst = std::max(worst, std::abs(int(ours.pixels[i]) - int(ref.pixels[i])));
      }
      EXPECT_EQ(worst, 0) << "largest difference from PIL, in 8-bit levels";
    }
  }
  fs::remove_all(dir);
}

// --- preprocessing ----------------------------------------------------------

TEST(Preprocess, HandComputedRescaleNormalizeAndCenterCrop) {
  // 2 x 4 image; centre crop 2 x 2 keeps columns 1 and 2.
  Image img = Image::filled(2, 4, 0, 0, 0);
  const uint8_t values[2][4] = {{0, 51, 255, 9}, {102, 204, 153, 7}};
  for (int y = 0; y < 2; ++y) {
    for (int x = 0; x < 4; ++x) {
      uint8_t* p = img.pixel(y, x);
      p[0] = values[y][x];
      p[1] = 255 - values[y][x];
      p[2] = 0;
    }
  }
  ImageProcessorConfig c;
  c.image_processor_type = "CLIPImageProcessor";
  c.do_resize = false;
  c.do_center_crop = true;
  c.crop_height = c.crop_width = 2;
  c.image_mean = {0.5, 0.25, 0.0};
  c.image_std = {0.5, 0.25, 2.0};
  ProcessedImage out = preprocess_image(img, c);
  ASSERT_EQ(out.pixel_values.sizes(), at::IntArrayRef({1, 3, 2, 2}));
  auto px = out.pixel_values.accessor<float, 4>();
  // red: (v / 255 - 0.5) / 0.5 for v = 51, 255, 204, 153
  EXPECT_NEAR(px[0][0][0][0], -0.6, 1e-6);
  EXPECT_NEAR(px[0][0][0][1], 1.0, 1e-6);
  EXPECT_NEAR(px[0][0][1][0], 0.6, 1e-6);
  EXPECT_NEAR(px[0][0][1][1], 0.2, 1e-6);
  // green: ((255 - v) / 255 - 0.25) / 0.25 for v = 51: 0.8 -> 2.2
  EXPECT_NEAR(px[0][1][0][0], 2.2, 1e-6);
  EXPECT_NEAR(px[0][2][1][1], 0.0, 1e-6);
}

TEST(Preprocess, Idefics3SplittingGeometry) {
  // 60 x 100 image, longest edge to 128: 76 x 128 (even height), then up to
  // multiples of 64: 128 x 128, split 2 x 2 into 64 x 64 crops plus the
  // global image resized to 64 x 64.
  Image img = test_pattern(60, 100, 5);
  ImageProcessorConfig c;
  c.image_processor_type = "Idefics3ImageProcessor";
  c.size_longest_edge = 128;
  c.max_image_size = 64;
  c.resample = Resample::kLanczos;
  c.do_normalize = false;
  c.do_rescale = false;
  c.do_image_splitting = true;
  ProcessedImage out = preprocess_image(img, c);
  EXPECT_EQ(out.rows, 2);
  EXPECT_EQ(out.cols, 2);
  ASSERT_EQ(out.pixel_values.sizes(), at::IntArrayRef({5, 3, 64, 64}));
  Image big =
      resize_image(resize_image(img, 76, 128, Resample::kLanczos), 128, 128, Resample::kLanczos);
  // Crop (row 1, col 0) is the bottom-left quarter.
  EXPECT_EQ(out.pixel_values[2][1][5][7].item<float>(), big.pixel(64 + 5, 7)[1]);
  EXPECT_EQ(out.pixel_values[1][2][63][0].item<float>(), big.pixel(63, 64)[2]);
  Image global = resize_image(big, 64, 64, Resample::kLanczos);
  EXPECT_EQ(out.pixel_values[4][0][10][20].item<float>(), global.pixel(10, 20)[0]);

  c.do_image_splitting = false;  // square to max_image_size
  ProcessedImage single = preprocess_image(img, c);
  EXPECT_EQ(single.rows, 0);
  ASSERT_EQ(single.pixel_values.sizes(), at::IntArrayRef({1, 3, 64, 64}));
}

// --- configs and models -----------------------------------------------------

VlmConfig small_idefics3() {
  VlmConfig c;
  c.layout = VlmLayout::kIdefics3;
  c.model_type = "idefics3";
  c.vision.model_type = "idefics3_vision";
  c.vision.hidden_size = 48;
  c.vision.intermediate_size = 80;
  c.vision.num_hidden_layers = 2;
  c.vision.num_attention_heads = 4;
  c.vision.image_size = 32;
  c.vision.patch_size = 8;  // 4 x 4 patches
  c.vision.hidden_act = "gelu_pytorch_tanh";
  c.scale_factor = 2;  // 4 image tokens
  c.text.model_type = "llama";
  c.text.vocab_size = 97;
  c.text.hidden_size = 64;
  c.text.intermediate_size = 96;
  c.text.num_hidden_layers = 2;
  c.text.num_attention_heads = 4;
  c.text.num_key_value_heads = 2;
  c.text.rms_norm_eps = 1e-5;
  c.text.rope_theta = 10000;
  c.image_token_id = 90;
  return c;
}

VlmConfig small_llava() {
  VlmConfig c;
  c.layout = VlmLayout::kLlava;
  c.model_type = "llava";
  c.vision.model_type = "clip_vision_model";
  c.vision.hidden_size = 40;
  c.vision.intermediate_size = 72;
  c.vision.num_hidden_layers = 3;
  c.vision.num_attention_heads = 5;
  c.vision.image_size = 28;
  c.vision.patch_size = 14;  // 2 x 2 patches + class token
  c.vision.hidden_act = "quick_gelu";
  c.vision.layer_norm_eps = 1e-5;
  c.vision_feature_layer = -2;
  c.text = small_idefics3().text;
  c.text.tie_word_embeddings = true;
  c.image_token_id = 95;
  return c;
}

TEST(VlmConfig, JsonRoundTripAndErrors) {
  for (const VlmConfig& c : {small_idefics3(), small_llava()}) {
    VlmConfig back = VlmConfig::parse(c.to_json());
    EXPECT_EQ(back.to_json(), c.to_json());
    EXPECT_EQ(back.image_seq_len(), c.layout == VlmLayout::kIdefics3 ? 4 : 4);
  }
  auto with = [](const std::string& json_text, const std::function<void(nlohmann::json&)>& edit) {
    auto j = nlohmann::json::parse(json_text);
    edit(j);
    return j.dump();
  };
  const std::string base = small_idefics3().to_json();
  expect_error(
      [&] { VlmConfig::parse(with(base, [](auto& j) { j["scale_factor"] = 3; }), "c.json"); },
      ErrorCode::kInvalidArgument, {"c.json", "scale_factor 3"});
  expect_error(
      [&] { VlmConfig::parse(with(base, [](auto& j) { j["image_token_id"] = 500; }), "c.json"); },
      ErrorCode::kInvalidArgument, {"image_token_id 500"});
  expect_error(
      [&] {
        VlmConfig::parse(with(base, [](auto& j) { j["vision_config"]["patch_sise"] = 8; }),
                         "c.json");
      },
      ErrorCode::kInvalidArgument, {"patch_sise"});
  expect_error(
      [&] { VlmConfig::parse(with(base, [](auto& j) { j["model_type"] = "blip2"; }), "c.json"); },
      ErrorCode::kInvalidArgument, {"blip2"});
  expect_error(
      [&] {
        VlmConfig::parse(with(base, [](auto& j) { j["text_config"]["use_resampler"] = true; }),
                         "c.json");
      },
      ErrorCode::kInvalidArgument, {"use_resampler"});
  expect_error(
      [&] {
        VlmConfig::parse(with(base, [](auto& j) { j["vision_config"]["image_size"] = 30; }),
                         "c.json");
      },
      ErrorCode::kInvalidArgument, {"image_size 30", "patch_size 8"});
  // LLaVA's usual sparse text_config: LlamaConfig defaults fill the rest.
  VlmConfig sparse = VlmConfig::parse(
      R"({"model_type": "llava", "image_token_index": 32000, "text_config": {"model_type": "llama",
          "vocab_size": 32064}, "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
          "image_size": 336, "patch_size": 14, "intermediate_size": 4096, "num_attention_heads": 16,
          "num_hidden_layers": 24, "projection_dim": 768}, "vision_feature_layer": -2})");
  EXPECT_EQ(sparse.text.hidden_size, 4096);
  EXPECT_EQ(sparse.image_seq_len(), 576);
}

TEST(Vlm, ParameterCountMatchesTheTensors) {
  for (const VlmConfig& c : {small_idefics3(), small_llava()}) {
    VisionLanguageModel m(c);
    int64_t n = 0;
    for (const auto& [name, t] : m.named_parameters()) n += t.numel();
    EXPECT_EQ(c.num_parameters(), n) << vlm_layout_name(c.layout);
  }
}

TEST(Vlm, PixelShuffleConnectorByHand) {
  VlmConfig c = small_idefics3();
  c.vision.hidden_size = 4;
  c.vision.num_attention_heads = 1;
  c.text.hidden_size = 16;
  VisionLanguageModel m(c);
  // proj = identity on the 16 shuffled features of each 2x2 patch block.
  for (auto& [name, t] : m.named_parameters()) {
    if (name == "model.connector.modality_projection.proj.weight") t.copy_(at::eye(16));
  }
  // 16 patches (4 x 4) with 4 features each: value = 10 * patch + feature.
  at::Tensor f = at::empty({1, 16, 4});
  for (int p = 0; p < 16; ++p) {
    for (int d = 0; d < 4; ++d) f[0][p][d] = 10 * p + d;
  }
  at::Tensor out = m.connect(f);
  ASSERT_EQ(out.sizes(), at::IntArrayRef({1, 4, 16}));
  // Token (r, c) holds patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1),
  // each with its 4 features in order.
  for (int r = 0; r < 2; ++r) {
    for (int col = 0; col < 2; ++col) {
      const int token = r * 2 + col;
      const int patches[4] = {8 * r + 2 * col, 8 * r + 2 * col + 1, 8 * r + 4 + 2 * col,
                              8 * r + 4 + 2 * col + 1};
      for (int k = 0; k < 4; ++k) {
        for (int d = 0; d < 4; ++d) {
          EXPECT_EQ(out[0][token][4 * k + d].item<float>(), 10 * patches[k] + d)
              << token << " " << k;
        }
      }
    }
  }
}

// Writes ids and pixels, runs the reference, returns features, connector
// output and logits.
std::vector<at::Tensor> reference_outputs(const fs::path& dir, const at::Tensor& ids,
                                          const at::Tensor& pixels,
                                          const std::vector<std::vector<int64_t>>& shapes) {
  {
    std::ofstream out(dir / "ids.json");
    out << "[";
    for (int64_t b = 0; b < ids.size(0); ++b) {
      out << (b ? ",[" : "[");
      for (int64_t t = 0; t < ids.size(1); ++t) out << (t ? "," : "") << ids[b][t].item<int64_t>();
      out << "]";
    }
    out << "]";
  }
  at::Tensor px = pixels.contiguous();
  write_file(dir / "pixels.bin",
             std::string(static_cast<const char*>(px.data_ptr()), px.numel() * 4));
  std::string log = run(std::string(kPython) + " " + kReference + " forward " + dir.string() + " " +
                        (dir / "ids.json").string() + " " + (dir / "pixels.bin").string() + " " +
                        (dir / "ref").string());
  std::vector<at::Tensor> out;
  const char* names[] = {"features", "connector", "logits"};
  for (size_t i = 0; i < 3; ++i) {
    std::string bytes = read_file(dir / (std::string("ref.") + names[i] + ".bin"));
    at::Tensor t = at::empty(shapes[i]);
    EXPECT_EQ(bytes.size(), static_cast<size_t>(t.numel() * 4)) << names[i] << ": " << log;
    if (bytes.size() == static_cast<size_t>(t.numel() * 4))
      std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    out.push_back(t);
  }
  return out;
}

void expect_close(const at::Tensor& ours, const at::Tensor& ref, double rtol, const char* what) {
  const double scale = ref.abs().max().item<double>();
  const double diff = (ours - ref).abs().max().item<double>();
  EXPECT_LE(diff, rtol * scale) << what << ": max |diff| " << diff << " at scale " << scale;
  EXPECT_GT(scale, 0) << what;
}

TEST(VlmReference, BothLayoutsMatchPyTorch) {
  TESSERA_REQUIRE_INSTALLED(have_reference(), std::string(kPython) + " with torch and PIL");
  for (const VlmConfig& c : {small_idefics3(), small_llava()}) {
    SCOPED_TRACE(vlm_layout_name(c.layout));
    fs::path dir = scratch(vlm_layout_name(c.layout));
    write_random_vlm(dir.string(), c, 7);
    VisionLanguageModel m = load_vlm(dir.string());
    // Two prompts, two images each: placeholders at different places.
    const int64_t n = c.image_seq_len(), T = 3 * n + 5;
    at::Tensor ids = at::randint(0, 80, {2, T}, at::kLong);
    for (int64_t k = 0; k < n; ++k) {
      ids[0][1 + k] = ids[0][n + 3 + k] = c.image_token_id;
      ids[1][k] = ids[1][2 * n + 4 + k] = c.image_token_id;
    }
    at::Tensor pixels = at::randn({4, 3, c.vision.image_size, c.vision.image_size});
    at::NoGradGuard no_grad;
    at::Tensor features = m.encode_images(pixels);
    at::Tensor tokens = m.connect(features);
    at::Tensor logits = m.forward(ids, pixels).logits;
    auto ref = reference_outputs(
        dir, ids, pixels, {features.sizes().vec(), tokens.sizes().vec(), logits.sizes().vec()});
    expect_close(features, ref[0], 1e-4, "encoder features");
    expect_close(tokens, ref[1], 1e-4, "connector output");
    expect_close(logits, ref[2], 1e-4, "logits");
    fs::remove_all(dir);
  }
}

TEST(Vlm, LoadErrorsNameTheTensor) {
  fs::path dir = scratch("load_errors");
  VlmConfig c = small_idefics3();
  WeightMap w = write_random_vlm(dir.string(), c, 3);
  // Config with one vision layer fewer: the checkpoint has tensors it does not describe.
  VlmConfig fewer = c;
  fewer.vision.num_hidden_layers = 1;
  VisionLanguageModel m1(fewer);
  expect_error([&] { m1.load_weights(w, "ckpt"); }, ErrorCode::kInvalidArgument,
               {"ckpt", "model.vision_model.encoder.layers.1."});
  // Wider text model: shapes disagree.
  VlmConfig wider = c;
  wider.text.intermediate_size = 128;
  VisionLanguageModel m2(wider);
  expect_error([&] { m2.load_weights(w, "ckpt"); }, ErrorCode::kInvalidArgument,
               {"model.text_model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[128, 64]"});
  WeightMap missing = w;
  missing.erase("model.connector.modality_projection.proj.weight");
  VisionLanguageModel m3(c);
  expect_error([&] { m3.load_weights(missing, "ckpt"); }, ErrorCode::kNotFound,
               {"model.connector.modality_projection.proj.weight"});
  // config.json that no longer matches the safetensors on disk.
  std::ofstream(dir / "config.json") << wider.to_json();
  expect_error([&] { load_vlm(dir.string()); }, ErrorCode::kInvalidArgument, {"gate_proj.weight"});
  fs::remove_all(dir);
}

TEST(Vlm, LlavaNewSpellingLoads) {
  VlmConfig c = small_llava();
  VisionLanguageModel m(c);
  m.init_random(5);
  WeightMap renamed;
  for (const auto& [name, t] : m.weights()) {
    std::string n = name;
    if (n.rfind("language_model.model.", 0) == 0)
      n = "model.language_model." + n.substr(21);
    else if (n.rfind("vision_tower.", 0) == 0 || n.rfind("multi_modal_projector.", 0) == 0)
      n = "model." + n;
    renamed[n] = t;
  }
  VisionLanguageModel back(c);
  back.load_weights(renamed, "new");
  for (const auto& [name, t] : back.weights()) EXPECT_TRUE(t.equal(m.weights().at(name))) << name;
}

TEST(Vlm, InputEmbedsEqualTheLookupInPlainAndPagedForwards) {
  VlmConfig c = small_idefics3();
  VisionLanguageModel m(c);
  m.init_random(9);
  at::NoGradGuard no_grad;
  Transformer& lm = m.language_model();
  at::Tensor ids = at::randint(0, 80, {2, 9}, at::kLong);
  ForwardOptions with;
  with.input_embeds = m.embed(ids, at::Tensor());
  EXPECT_TRUE(lm.forward(ids, with).logits.equal(lm.forward(ids).logits));
  PagedKVCache cache(c.text, 4, 8);
  PagedBatch batch;
  batch.cache = &cache;
  batch.sequences.push_back({9, 0, {0, 1}, -1});
  for (int64_t i = 0; i < 9; ++i) batch.logits_rows.push_back(i);
  ForwardOptions paged;
  paged.paged = &batch;
  at::Tensor one = ids.narrow(0, 0, 1);
  at::Tensor plain = lm.forward(one, paged).logits;
  paged.input_embeds = m.embed(one, at::Tensor());
  EXPECT_TRUE(lm.forward(one, paged).logits.equal(plain));
  paged.input_embeds = at::zeros({1, 8, c.text.hidden_size});
  expect_error([&] { lm.forward(one, paged); }, ErrorCode::kInvalidArgument,
               {"input_embeds", "[1, 9, 64]"});
}

TEST(Vlm, PlaceholderCountMustMatchImages) {
  VisionLanguageModel m(small_idefics3());
  at::Tensor ids = at::full({1, 6}, 3, at::kLong);
  ids[0][1] = 90;
  expect_error(
      [&] {
        m.forward(ids, at::zeros({1, 3, 32, 32}));
      },
      ErrorCode::kInvalidArgument, {"1 image tokens", "4 per image"});
  expect_error(
      [&] {
        m.forward(ids, at::zeros({1, 3, 30, 30}));
      },
      ErrorCode::kInvalidArgument, {"pixel_values", "[N, 3, 32, 32]"});
}

TEST(Vlm, CachedGenerationWithImagesEqualsRecomputation) {
  VisionLanguageModel m(small_idefics3());
  m.init_random(11);
  std::vector<VlmInput> inputs(3);
  inputs[0].ids = {1, 2, 90, 90, 90, 90, 5, 6, 7};
  inputs[0].pixel_values = at::randn({1, 3, 32, 32});
  inputs[1].ids = {90, 90, 90, 90, 4, 90, 90, 90, 90, 8};
  inputs[1].pixel_values = at::randn({2, 3, 32, 32});
  inputs[2].ids = {3, 4};  // text only
  SamplingOptions s;
  s.max_new_tokens = 6;
  GenerationResult cached = generate_vlm(m, inputs, s);
  s.use_cache = false;
  GenerationResult full = generate_vlm(m, inputs, s);
  EXPECT_EQ(cached.tokens, full.tokens);
  EXPECT_EQ(cached.new_tokens, 18);
  // The image matters: another image changes the answer's logits.
  ForwardOutput a = m.forward(at::tensor(inputs[0].ids).view({1, -1}), inputs[0].pixel_values);
  ForwardOutput b = m.forward(at::tensor(inputs[0].ids).view({1, -1}), at::randn({1, 3, 32, 32}));
  EXPECT_FALSE(a.logits.select(1, 8).allclose(b.logits.select(1, 8)));
}

TEST(Vlm, ChatFormatsAndMarkerExpansion) {
  EXPECT_EQ(format_vlm_chat(VlmLayout::kIdefics3, {{"user", "How many?", 1}}),
            "<|im_start|>User:<image>How many?<end_of_utterance>\nAssistant:");
  EXPECT_EQ(
      format_vlm_chat(VlmLayout::kIdefics3, {{"system", "Be brief.", 0}, {"user", "Hi", 0}}),
      "<|im_start|>System: Be brief.<end_of_utterance>\nUser: Hi<end_of_utterance>\nAssistant:");
  EXPECT_EQ(format_vlm_chat(VlmLayout::kLlava, {{"user", "What is shown?", 1}}),
            "USER: <image>\nWhat is shown? ASSISTANT:");
  VlmConfig c = small_idefics3();
  ProcessedImage split;
  split.rows = 1;
  split.cols = 2;
  const std::string four = "<image><image><image><image>";
  EXPECT_EQ(expand_image_markers("a<image>b", c, {split}),
            "a<fake_token_around_image><row_1_col_1>" + four +
                "<fake_token_around_image><row_1_col_2>" + four +
                "\n\n<fake_token_around_image><global-img>" + four + "<fake_token_around_image>b");
  expect_error([&] { expand_image_markers("<image><image>", c, {split}); },
               ErrorCode::kInvalidArgument, {"2 <image> markers", "1 images"});
}

}  // namespace
}  // namespace tessera::nn
