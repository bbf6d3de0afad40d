// tessera/nn/image.h — 8-bit RGB images: PNG and JPEG files, resizing and
// cropping the way Hugging Face image processors do them.
//
// Decoding goes through Debian's libpng and libjpeg-turbo. Every image comes
// out as 8-bit RGB: grey is replicated, palettes are expanded, 16-bit
// samples keep their high byte, and transparency is composited over white
// with PIL's integer arithmetic (transformers' convert_to_rgb does
// image.convert("RGBA") then alpha_composite over white). resize_image()
// reproduces PIL's Image.resize on RGB images (its two-pass separable
// filters with 22-bit fixed-point coefficients), which is what the
// processors call, so a Tessera preprocessed image equals transformers' to
// the last bit for the filters listed in Resample.
//
//   tessera::nn::Image img = tessera::nn::read_image("cat.jpg");
//   auto small = tessera::nn::resize_image(img, 512, 512, tessera::nn::Resample::kLanczos);
//   tessera::nn::write_png("small.png", small);
//
// Thread safety: Image is a plain value; every function is thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::nn {

// An 8-bit RGB image: rows top to bottom, pixels left to right, R G B
// interleaved (height * width * 3 bytes).
struct Image {
  int64_t height = 0;
  int64_t width = 0;
  std::vector<uint8_t> pixels;

  // An image of one colour. InvalidArgument for sizes < 1.
  static Image filled(int64_t height, int64_t width, uint8_t r, uint8_t g, uint8_t b);
  uint8_t* pixel(int64_t y, int64_t x) { return pixels.data() + (y * width + x) * 3; }
  const uint8_t* pixel(int64_t y, int64_t x) const { return pixels.data() + (y * width + x) * 3; }
  bool operator==(const Image& other) const {
    return height == other.height && width == other.width && pixels == other.pixels;
  }
};

// Largest side accepted when decoding (a guard against decompression bombs
// and corrupt headers that claim huge sizes).
inline constexpr int64_t kMaxImageSide = 16384;

// Decodes PNG or JPEG bytes, recognised by their signature. `source` names
// the data in messages (a file name, "request 3 image 0"). InvalidArgument
// naming the source when the bytes are neither PNG nor JPEG (the message
// quotes the first bytes), when the image is larger than kMaxImageSide or
// is a CMYK JPEG; DataLoss naming the source and the decoder's complaint
// for a corrupt or truncated file.
Image decode_image(std::string_view bytes, const std::string& source = "<memory>");

// Reads and decodes a file. NotFound when it cannot be opened; otherwise as
// decode_image with the path as the source.
Image read_image(const std::string& path);

// PNG bytes of `image` (8-bit RGB, default compression). InvalidArgument
// for an empty or inconsistent image.
std::string encode_png(const Image& image);
// JPEG bytes (baseline, 4:2:0, `quality` in [1, 100]).
std::string encode_jpeg(const Image& image, int quality = 90);
// Writes a PNG or JPEG (by the extension: .png, .jpg, .jpeg) atomically.
// InvalidArgument for another extension; I/O errors as throw_io_error.
void write_image(const std::string& path, const Image& image);

// Resampling filters with PIL's numbering, as preprocessor_config.json's
// "resample" field stores them.
enum class Resample {
  kNearest = 0,
  kLanczos = 1,
  kBilinear = 2,
  kBicubic = 3,
  kBox = 4,
  kHamming = 5
};
// "nearest", "lanczos", ...
const char* resample_name(Resample resample);
// From the integer of a preprocessor_config.json; InvalidArgument otherwise.
Resample resample_from_int(int64_t value);

// `image` resized to height x width exactly as PIL's Image.resize((width,
// height), resample) on an RGB image. The same size returns a copy.
// InvalidArgument for sizes < 1 or > kMaxImageSide.
Image resize_image(const Image& image, int64_t height, int64_t width, Resample resample);

// The rectangle [top, top + height) x [left, left + width); InvalidArgument
// when it is empty or leaves the image.
Image crop_image(const Image& image, int64_t top, int64_t left, int64_t height, int64_t width);

}  // namespace tessera::nn
