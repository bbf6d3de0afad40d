#include "tessera/nn/image.h"

// clang-format off
#include <cstdio>   // jpeglib.h needs FILE and size_t first
#include <csetjmp>
#include <jpeglib.h>
#include <png.h>
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "tessera/core/error.h"
#include "tessera/core/file_io.h"

namespace tessera::nn {
namespace {

void check_image(const Image& image, const char* what) {
  TESSERA_CHECK(image.height >= 1 && image.width >= 1 &&
                    image.pixels.size() == static_cast<size_t>(image.height * image.width * 3),
                InvalidArgument, what, ": image of ", image.height, "x", image.width, " with ",
                image.pixels.size(), " bytes is not a valid RGB image");
}

void check_size(int64_t height, int64_t width, const std::string& source) {
  TESSERA_CHECK(height >= 1 && width >= 1, DataLoss, source, ": image has size ", width, "x",
                height);
  TESSERA_CHECK(height <= kMaxImageSide && width <= kMaxImageSide, InvalidArgument, source,
                ": image of ", width, "x", height, " exceeds the largest side accepted (",
                kMaxImageSide, ")");
}

// PIL's alpha_composite of (r, g, b, a) over opaque white, with its integer
// arithmetic (AlphaComposite.c, 7 extra bits of precision, rounded
// divisions by 255).
void composite_over_white(const uint8_t* rgba, uint8_t* rgb) {
  const uint32_t a = rgba[3];
  if (a == 255) {
    std::memcpy(rgb, rgba, 3);
    return;
  }
  if (a == 0) {
    rgb[0] = rgb[1] = rgb[2] = 255;
    return;
  }
  constexpr uint32_t kBits = 7;
  const uint32_t blend = 255 * (255 - a);
  const uint32_t outa255 = a * 255 + blend;
  const uint32_t coef1 = a * 255 * 255 * (1u << kBits) / outa255;
  const uint32_t coef2 = 255 * (1u << kBits) - coef1;
  for (int c = 0; c < 3; ++c) {
    uint32_t tmp = rgba[c] * coef1 + 255u * coef2 + (0x80u << kBits);
    rgb[c] = static_cast<uint8_t>((((tmp >> 8) + tmp) >> 8) >> kBits);
  }
}

// --- PNG -------------------------------------------------------------------

struct PngReader {
  const uint8_t* data;
  size_t size;
  size_t offset;
};

struct PngFailure {
  jmp_buf jump;
  char message[256];
};

void png_read_bytes(png_structp png, png_bytep out, png_size_t n) {
  auto* reader = static_cast<PngReader*>(png_get_io_ptr(png));
  if (n > reader->size - reader->offset) png_error(png, "unexpected end of data (truncated file)");
  std::memcpy(out, reader->data + reader->offset, n);
  reader->offset += n;
}

void png_fail(png_structp png, png_const_charp message) {
  auto* failure = static_cast<PngFailure*>(png_get_error_ptr(png));
  std::snprintf(failure->message, sizeof(failure->message), "%s", message);
  longjmp(failure->jump, 1);
}

void png_ignore_warning(png_structp, png_const_charp) {}

// Decodes into 8-bit RGBA rows. Returns false with failure->message set on
// error. No C++ object with a destructor lives in this frame across
// setjmp, so the longjmp from libpng skips nothing.
bool decode_png_rgba(PngReader* reader, PngFailure* failure, std::vector<uint8_t>* rgba,
                     uint32_t* width, uint32_t* height, std::vector<png_bytep>* rows) {
  png_structp png =
      png_create_read_struct(PNG_LIBPNG_VER_STRING, failure, png_fail, png_ignore_warning);
  if (png == nullptr) {
    std::snprintf(failure->message, sizeof(failure->message), "out of memory");
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(failure->jump)) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  png_set_read_fn(png, reader, png_read_bytes);
  png_set_user_limits(png, kMaxImageSide, kMaxImageSide);
  png_read_info(png, info);
  *width = png_get_image_width(png, info);
  *height = png_get_image_height(png, info);
  const int color = png_get_color_type(png, info);
  if (png_get_bit_depth(png, info) == 16) png_set_strip_16(png);  // PIL keeps the high byte
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color == PNG_COLOR_TYPE_GRAY && png_get_bit_depth(png, info) < 8) {
    png_set_expand_gray_1_2_4_to_8(png);
  }
  if (png_get_valid(png, info, PNG_INFO_tRNS)) png_set_tRNS_to_alpha(png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(png);
  png_set_filler(png, 0xff, PNG_FILLER_AFTER);  // no-op when alpha is present
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  if (png_get_rowbytes(png, info) != static_cast<size_t>(*width) * 4) {
    png_error(png, "unexpected row layout after conversion to RGBA");
  }
  rgba->resize(static_cast<size_t>(*width) * *height * 4);
  rows->resize(*height);
  for (uint32_t y = 0; y < *height; ++y)
    (*rows)[y] = rgba->data() + static_cast<size_t>(y) * *width * 4;
  png_read_image(png, rows->data());
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

Image decode_png(std::string_view bytes, const std::string& source) {
  PngReader reader{reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), 0};
  PngFailure failure{};
  std::vector<uint8_t> rgba;
  std::vector<png_bytep> rows;
  uint32_t width = 0, height = 0;
  if (!decode_png_rgba(&reader, &failure, &rgba, &width, &height, &rows)) {
    const std::string message = failure.message;
    if (message.find("exceeds user limits") != std::string::npos ||
        message.find("Image width exceeds") != std::string::npos ||
        message.find("Image height exceeds") != std::string::npos) {
      TESSERA_THROW(InvalidArgument, source, ": PNG image larger than the largest side accepted (",
                    kMaxImageSide, "): ", message);
    }
    TESSERA_THROW(DataLoss, source, ": corrupt PNG file: ", message);
  }
  check_size(height, width, source);
  Image image;
  image.height = height;
  image.width = width;
  image.pixels.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0, n = static_cast<size_t>(width) * height; i < n; ++i) {
    composite_over_white(rgba.data() + 4 * i, image.pixels.data() + 3 * i);
  }
  return image;
}

struct PngWriter {
  std::string* out;
};

void png_write_bytes(png_structp png, png_bytep data, png_size_t n) {
  static_cast<PngWriter*>(png_get_io_ptr(png))->out->append(reinterpret_cast<const char*>(data), n);
}

void png_flush_nothing(png_structp) {}

bool encode_png_raw(const Image& image, std::string* out, PngFailure* failure,
                    std::vector<png_bytep>* rows) {
  png_structp png =
      png_create_write_struct(PNG_LIBPNG_VER_STRING, failure, png_fail, png_ignore_warning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(failure->jump)) {
    png_destroy_write_struct(&png, info ? &info : nullptr);
    return false;
  }
  PngWriter writer{out};
  png_set_write_fn(png, &writer, png_write_bytes, png_flush_nothing);
  png_set_IHDR(png, info, static_cast<uint32_t>(image.width), static_cast<uint32_t>(image.height),
               8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  rows->resize(image.height);
  for (int64_t y = 0; y < image.height; ++y) {
    (*rows)[y] = const_cast<png_bytep>(image.pixels.data() + y * image.width * 3);
  }
  png_write_image(png, rows->data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

// --- JPEG ------------------------------------------------------------------

struct JpegFailure {
  jpeg_error_mgr manager;  // first member: libjpeg hands back a pointer to it
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
  int warnings;
  char first_warning[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr cinfo) {
  auto* failure = reinterpret_cast<JpegFailure*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, failure->message);
  longjmp(failure->jump, 1);
}

// libjpeg only warns about a truncated or corrupt stream (and fills the
// rest with grey); PIL refuses such files, and so do we.
void jpeg_message(j_common_ptr cinfo, int level) {
  auto* failure = reinterpret_cast<JpegFailure*>(cinfo->err);
  if (level < 0) {
    if (failure->warnings++ == 0) (*cinfo->err->format_message)(cinfo, failure->first_warning);
  }
}

enum class JpegResult { kOk, kError, kCmyk, kTooLarge };

JpegResult decode_jpeg_raw(std::string_view bytes, JpegFailure* failure, std::vector<uint8_t>* rgb,
                           uint32_t* width, uint32_t* height) {
  jpeg_decompress_struct cinfo;
  cinfo.err = jpeg_std_error(&failure->manager);
  failure->manager.error_exit = jpeg_fail;
  failure->manager.emit_message = jpeg_message;
  if (setjmp(failure->jump)) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kError;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, reinterpret_cast<const unsigned char*>(bytes.data()),
               static_cast<unsigned long>(bytes.size()));
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kCmyk;
  }
  if (cinfo.image_width > kMaxImageSide || cinfo.image_height > kMaxImageSide) {
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::kTooLarge;
  }
  cinfo.out_color_space = JCS_RGB;
  jpeg_start_decompress(&cinfo);
  *width = cinfo.output_width;
  *height = cinfo.output_height;
  rgb->resize(static_cast<size_t>(*width) * *height * 3);
  while (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW row = rgb->data() + static_cast<size_t>(cinfo.output_scanline) * *width * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return JpegResult::kOk;
}

Image decode_jpeg(std::string_view bytes, const std::string& source) {
  JpegFailure failure{};
  std::vector<uint8_t> rgb;
  uint32_t width = 0, height = 0;
  switch (decode_jpeg_raw(bytes, &failure, &rgb, &width, &height)) {
    case JpegResult::kError:
      TESSERA_THROW(DataLoss, source, ": corrupt JPEG file: ", failure.message);
    case JpegResult::kCmyk:
      TESSERA_THROW(InvalidArgument, source, ": CMYK/YCCK JPEG images are not supported");
    case JpegResult::kTooLarge:
      check_size(height, width, source);
      break;
    case JpegResult::kOk:
      break;
  }
  TESSERA_CHECK(failure.warnings == 0, DataLoss, source,
                ": corrupt or truncated JPEG file: ", failure.first_warning);
  check_size(height, width, source);
  Image image;
  image.height = height;
  image.width = width;
  image.pixels = std::move(rgb);
  return image;
}

bool encode_jpeg_raw(const Image& image, int quality, JpegFailure* failure, unsigned char** buffer,
                     unsigned long* size) {
  jpeg_compress_struct cinfo;
  cinfo.err = jpeg_std_error(&failure->manager);
  failure->manager.error_exit = jpeg_fail;
  if (setjmp(failure->jump)) {
    jpeg_destroy_compress(&cinfo);
    return false;
  }
  jpeg_create_compress(&cinfo);
  jpeg_mem_dest(&cinfo, buffer, size);
  cinfo.image_width = static_cast<JDIMENSION>(image.width);
  cinfo.image_height = static_cast<JDIMENSION>(image.height);
  cinfo.input_components = 3;
  cinfo.in_color_space = JCS_RGB;
  jpeg_set_defaults(&cinfo);
  jpeg_set_quality(&cinfo, quality, TRUE);
  jpeg_start_compress(&cinfo, TRUE);
  while (cinfo.next_scanline < cinfo.image_height) {
    JSAMPROW row =
        const_cast<JSAMPROW>(image.pixels.data() + cinfo.next_scanline * image.width * 3);
    jpeg_write_scanlines(&cinfo, &row, 1);
  }
  jpeg_finish_compress(&cinfo);
  jpeg_destroy_compress(&cinfo);
  return true;
}

// --- PIL's resampling ------------------------------------------------------

struct Filter {
  double (*fn)(double);
  double support;
};

double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
double bilinear_filter(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}
double hamming_filter(double x) {
  x = std::fabs(x);
  if (x == 0.0) return 1.0;
  if (x >= 1.0) return 0.0;
  x *= M_PI;
  return std::sin(x) / x * (0.54f + 0.46f * std::cos(x));
}
double bicubic_filter(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}
double sinc(double x) {
  if (x == 0.0) return 1.0;
  x *= M_PI;
  return std::sin(x) / x;
}
double lanczos_filter(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

Filter filter_of(Resample r) {
  switch (r) {
    case Resample::kBox:
      return {box_filter, 0.5};
    case Resample::kBilinear:
      return {bilinear_filter, 1.0};
    case Resample::kHamming:
      return {hamming_filter, 1.0};
    case Resample::kBicubic:
      return {bicubic_filter, 2.0};
    case Resample::kLanczos:
      return {lanczos_filter, 3.0};
    case Resample::kNearest:
      break;
  }
  TESSERA_THROW(Internal, "no convolution filter for ", resample_name(r));
}

constexpr int kPrecisionBits = 32 - 8 - 2;

// Per output index: the first input index, the count, and ksize fixed-point
// weights (PIL's precompute_coeffs + normalize_coeffs_8bpc).
struct Coefficients {
  int ksize = 0;
  std::vector<int> bounds;       // [out * 2]: xmin, count
  std::vector<int32_t> weights;  // [out * ksize]
};

Coefficients precompute(int in_size, int out_size, const Filter& filter) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = filter.support * filterscale;
  Coefficients c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(out_size * 2);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = filter.fn((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      c.weights[static_cast<size_t>(xx) * c.ksize + x] = static_cast<int32_t>(
          w < 0 ? -0.5 + w * (1 << kPrecisionBits) : 0.5 + w * (1 << kPrecisionBits));
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int64_t v) {
  v >>= kPrecisionBits;
  return static_cast<uint8_t>(std::clamp<int64_t>(v, 0, 255));
}

Image resize_convolution(const Image& in, int64_t height, int64_t width, Resample resample) {
  const Filter filter = filter_of(resample);
  const Coefficients horiz =
      precompute(static_cast<int>(in.width), static_cast<int>(width), filter);
  const Coefficients vert =
      precompute(static_cast<int>(in.height), static_cast<int>(height), filter);
  const bool need_h = width != in.width, need_v = height != in.height;
  // Horizontal pass over the rows the vertical pass reads.
  const int ybox_first = need_h ? vert.bounds[0] : 0;
  const int ybox_last = need_h ? vert.bounds[(height - 1) * 2] + vert.bounds[(height - 1) * 2 + 1]
                               : static_cast<int>(in.height);
  Image tmp;
  const Image* src = &in;
  if (need_h) {
    tmp.height = ybox_last - ybox_first;
    tmp.width = width;
    tmp.pixels.resize(static_cast<size_t>(tmp.height) * width * 3);
    for (int64_t y = 0; y < tmp.height; ++y) {
      for (int64_t xx = 0; xx < width; ++xx) {
        const int xmin = horiz.bounds[xx * 2], count = horiz.bounds[xx * 2 + 1];
        const int32_t* k = horiz.weights.data() + xx * horiz.ksize;
        int64_t ss[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1),
                         1 << (kPrecisionBits - 1)};
        for (int x = 0; x < count; ++x) {
          const uint8_t* p = in.pixel(y + ybox_first, x + xmin);
          for (int c = 0; c < 3; ++c) ss[c] += static_cast<int64_t>(p[c]) * k[x];
        }
        uint8_t* o = tmp.pixel(y, xx);
        for (int c = 0; c < 3; ++c) o[c] = clip8(ss[c]);
      }
    }
    src = &tmp;
  }
  if (!need_v) return need_h ? tmp : in;
  Image out;
  out.height = height;
  out.width = src->width;
  out.pixels.resize(static_cast<size_t>(height) * out.width * 3);
  for (int64_t yy = 0; yy < height; ++yy) {
    const int ymin = vert.bounds[yy * 2] - ybox_first, count = vert.bounds[yy * 2 + 1];
    const int32_t* k = vert.weights.data() + yy * vert.ksize;
    for (int64_t x = 0; x < out.width; ++x) {
      int64_t ss[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1),
                       1 << (kPrecisionBits - 1)};
      for (int y = 0; y < count; ++y) {
        const uint8_t* p = src->pixel(y + ymin, x);
        for (int c = 0; c < 3; ++c) ss[c] += static_cast<int64_t>(p[c]) * k[y];
      }
      uint8_t* o = out.pixel(yy, x);
      for (int c = 0; c < 3; ++c) o[c] = clip8(ss[c]);
    }
  }
  return out;
}

// PIL's NEAREST: an affine transform sampling the pixel under each output
// pixel's centre.
Image resize_nearest(const Image& in, int64_t height, int64_t width) {
  Image out;
  out.height = height;
  out.width = width;
  out.pixels.resize(static_cast<size_t>(height) * width * 3);
  const double sx = static_cast<double>(in.width) / width,
               sy = static_cast<double>(in.height) / height;
  for (int64_t y = 0; y < height; ++y) {
    const int64_t iy = std::min<int64_t>(static_cast<int64_t>((y + 0.5) * sy), in.height - 1);
    for (int64_t x = 0; x < width; ++x) {
      const int64_t ix = std::min<int64_t>(static_cast<int64_t>((x + 0.5) * sx), in.width - 1);
      std::memcpy(out.pixel(y, x), in.pixel(iy, ix), 3);
    }
  }
  return out;
}

std::string printable_prefix(std::string_view bytes) {
  std::ostringstream out;
  out << std::hex;
  for (size_t i = 0; i < std::min<size_t>(bytes.size(), 8); ++i) {
    out << (i ? " " : "") << static_cast<int>(static_cast<uint8_t>(bytes[i]));
  }
  return out.str();
}

}  // namespace

Image Image::filled(int64_t height, int64_t width, uint8_t r, uint8_t g, uint8_t b) {
  TESSERA_CHECK(height >= 1 && width >= 1, InvalidArgument, "Image::filled: size ", width, "x",
                height, " must be positive");
  Image image;
  image.height = height;
  image.width = width;
  image.pixels.resize(static_cast<size_t>(height) * width * 3);
  for (size_t i = 0; i < image.pixels.size(); i += 3) {
    image.pixels[i] = r;
    image.pixels[i + 1] = g;
    image.pixels[i + 2] = b;
  }
  return image;
}

Image decode_image(std::string_view bytes, const std::string& source) {
  static constexpr unsigned char kPngSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() >= 8 && std::memcmp(bytes.data(), kPngSignature, 8) == 0) {
    return decode_png(bytes, source);
  }
  if (bytes.size() >= 3 && static_cast<uint8_t>(bytes[0]) == 0xff &&
      static_cast<uint8_t>(bytes[1]) == 0xd8 && static_cast<uint8_t>(bytes[2]) == 0xff) {
    return decode_jpeg(bytes, source);
  }
  TESSERA_THROW(InvalidArgument, source, ": not a PNG or JPEG image (", bytes.size(),
                " bytes, starting ",
                bytes.empty() ? std::string("<empty>") : printable_prefix(bytes), ")");
}

Image read_image(const std::string& path) {
  MappedFile file(path);
  return decode_image(std::string_view(reinterpret_cast<const char*>(file.data()), file.size()),
                      path);
}

std::string encode_png(const Image& image) {
  check_image(image, "encode_png");
  std::string out;
  PngFailure failure{};
  std::vector<png_bytep> rows;
  TESSERA_CHECK(encode_png_raw(image, &out, &failure, &rows), Internal,
                "encode_png: ", failure.message);
  return out;
}

std::string encode_jpeg(const Image& image, int quality) {
  check_image(image, "encode_jpeg");
  TESSERA_CHECK(quality >= 1 && quality <= 100, InvalidArgument, "encode_jpeg: quality ", quality,
                " outside [1, 100]");
  JpegFailure failure{};
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  const bool ok = encode_jpeg_raw(image, quality, &failure, &buffer, &size);
  std::string out = ok ? std::string(reinterpret_cast<const char*>(buffer), size) : std::string();
  std::free(buffer);
  TESSERA_CHECK(ok, Internal, "encode_jpeg: ", failure.message);
  return out;
}

void write_image(const std::string& path, const Image& image) {
  const auto dot = path.rfind('.');
  std::string ext = dot == std::string::npos ? "" : path.substr(dot + 1);
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return std::tolower(c); });
  std::string bytes;
  if (ext == "png") {
    bytes = encode_png(image);
  } else if (ext == "jpg" || ext == "jpeg") {
    bytes = encode_jpeg(image);
  } else {
    TESSERA_THROW(InvalidArgument, "write_image: '", path,
                  "' has no .png, .jpg or .jpeg extension");
  }
  AtomicFileWriter writer(path);
  writer.append(bytes.data(), bytes.size());
  writer.commit();
}

const char* resample_name(Resample resample) {
  switch (resample) {
    case Resample::kNearest:
      return "nearest";
    case Resample::kLanczos:
      return "lanczos";
    case Resample::kBilinear:
      return "bilinear";
    case Resample::kBicubic:
      return "bicubic";
    case Resample::kBox:
      return "box";
    case Resample::kHamming:
      return "hamming";
  }
  return "?";
}

Resample resample_from_int(int64_t value) {
  TESSERA_CHECK(
      value >= 0 && value <= 5, InvalidArgument, "resample ", value,
      " is not a PIL filter (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)");
  return static_cast<Resample>(value);
}

Image resize_image(const Image& image, int64_t height, int64_t width, Resample resample) {
  check_image(image, "resize_image");
  TESSERA_CHECK(height >= 1 && width >= 1 && height <= kMaxImageSide && width <= kMaxImageSide,
                InvalidArgument, "resize_image: target size ", width, "x", height, " outside [1, ",
                kMaxImageSide, "]");
  if (height == image.height && width == image.width) return image;
  if (resample == Resample::kNearest) return resize_nearest(image, height, width);
  return resize_convolution(image, height, width, resample);
}

Image crop_image(const Image& image, int64_t top, int64_t left, int64_t height, int64_t width) {
  check_image(image, "crop_image");
  TESSERA_CHECK(top >= 0 && left >= 0 && height >= 1 && width >= 1 &&
                    top + height <= image.height && left + width <= image.width,
                InvalidArgument, "crop_image: rectangle ", width, "x", height, " at (", left, ", ",
                top, ") leaves the ", image.width, "x", image.height, " image");
  Image out;
  out.height = height;
  out.width = width;
  out.pixels.resize(static_cast<size_t>(height) * width * 3);
  for (int64_t y = 0; y < height; ++y) {
    std::memcpy(out.pixel(y, 0), image.pixel(top + y, left), static_cast<size_t>(width) * 3);
  }
  return out;
}

}  // namespace tessera::nn
