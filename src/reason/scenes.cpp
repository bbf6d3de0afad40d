#include "tessera/reason/scenes.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <set>

#include "tessera/core/error.h"

namespace tessera::reason {
namespace {

constexpr uint8_t kPalette[4][3] = {{220, 40, 40}, {40, 170, 60}, {40, 80, 220}, {230, 200, 30}};
constexpr uint8_t kBackground[3] = {245, 245, 240};

// Uniform integer in [0, n) from the generator's raw output (the standard
// distributions differ between library implementations; this does not).
int pick(std::mt19937_64& rng, int n) { return static_cast<int>(rng() % static_cast<uint64_t>(n)); }
double uniform(std::mt19937_64& rng, double lo, double hi) {
  return lo + (hi - lo) * static_cast<double>(rng() >> 11) / static_cast<double>(uint64_t{1} << 53);
}

double radius_of(const Scene& scene, int size) {
  return (size == 0 ? 4.5 : 8.0) * static_cast<double>(scene.image_size) / 64.0;
}

bool inside(const SceneObject& o, double r, double px, double py) {
  const double dx = px - o.x, dy = py - o.y;
  switch (o.shape) {
    case 0:
      return dx * dx + dy * dy <= r * r;
    case 1:
      return std::fabs(dx) <= 0.85 * r && std::fabs(dy) <= 0.85 * r;
    default: {
      // Upward triangle (0, -r), (-0.95 r, 0.75 r), (0.95 r, 0.75 r).
      const double ax = 0, ay = -r, bx = -0.95 * r, by = 0.75 * r, cx = 0.95 * r, cy = 0.75 * r;
      auto side = [&](double x1, double y1, double x2, double y2) {
        return (x2 - x1) * (dy - y1) - (y2 - y1) * (dx - x1);
      };
      const double s1 = side(ax, ay, bx, by), s2 = side(bx, by, cx, cy), s3 = side(cx, cy, ax, ay);
      return (s1 <= 0 && s2 <= 0 && s3 <= 0) || (s1 >= 0 && s2 >= 0 && s3 >= 0);
    }
  }
}

std::string plural(int shape, int n) { return std::string(kShapes[shape]) + (n == 1 ? "" : "s"); }

std::string pair_name(int color, int shape) {
  return std::string(kColors[color]) + " " + kShapes[shape];
}

}  // namespace

int Scene::count(int shape, int color, int size) const {
  int n = 0;
  for (const SceneObject& o : objects) {
    if ((shape < 0 || o.shape == shape) && (color < 0 || o.color == color) &&
        (size < 0 || o.size == size))
      ++n;
  }
  return n;
}

Scene make_scene(uint64_t seed, const SceneOptions& options) {
  TESSERA_CHECK(options.image_size >= 32, InvalidArgument, "make_scene: image_size ",
                options.image_size, " is below 32");
  TESSERA_CHECK(options.min_objects >= 1 && options.max_objects <= 12 &&
                    options.min_objects <= options.max_objects,
                InvalidArgument, "make_scene: object counts [", options.min_objects, ", ",
                options.max_objects, "] must lie in [1, 12]");
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + 17);
  Scene scene;
  scene.image_size = options.image_size;
  const int wanted = options.min_objects + pick(rng, options.max_objects - options.min_objects + 1);
  const double size = static_cast<double>(options.image_size);
  for (int attempt = 0; attempt < 400 && static_cast<int>(scene.objects.size()) < wanted;
       ++attempt) {
    SceneObject o;
    o.shape = pick(rng, 3);
    o.color = pick(rng, 4);
    o.size = pick(rng, 2);
    const double r = radius_of(scene, o.size);
    o.x = uniform(rng, r + 1, size - r - 1);
    o.y = uniform(rng, r + 1, size - r - 1);
    bool clear = true;
    for (const SceneObject& other : scene.objects) {
      const double gap = std::hypot(o.x - other.x, o.y - other.y);
      if (gap < r + radius_of(scene, other.size) + 2) clear = false;
    }
    if (clear) scene.objects.push_back(o);
  }
  return scene;
}

nn::Image render_scene(const Scene& scene) {
  nn::Image img = nn::Image::filled(scene.image_size, scene.image_size, kBackground[0],
                                    kBackground[1], kBackground[2]);
  constexpr int kSub = 4;
  for (const SceneObject& o : scene.objects) {
    const double r = radius_of(scene, o.size);
    const int64_t y0 = std::max<int64_t>(0, static_cast<int64_t>(o.y - r - 1));
    const int64_t y1 = std::min<int64_t>(scene.image_size - 1, static_cast<int64_t>(o.y + r + 1));
    const int64_t x0 = std::max<int64_t>(0, static_cast<int64_t>(o.x - r - 1));
    const int64_t x1 = std::min<int64_t>(scene.image_size - 1, static_cast<int64_t>(o.x + r + 1));
    for (int64_t y = y0; y <= y1; ++y) {
      for (int64_t x = x0; x <= x1; ++x) {
        int hits = 0;
        for (int sy = 0; sy < kSub; ++sy) {
          for (int sx = 0; sx < kSub; ++sx) {
            hits += inside(o, r, x + (sx + 0.5) / kSub, y + (sy + 0.5) / kSub);
          }
        }
        if (hits == 0) continue;
        const double a = static_cast<double>(hits) / (kSub * kSub);
        uint8_t* p = img.pixel(y, x);
        for (int c = 0; c < 3; ++c)
          p[c] = static_cast<uint8_t>(std::lround((1 - a) * p[c] + a * kPalette[o.color][c]));
      }
    }
  }
  return img;
}

std::string caption(const Scene& scene) {
  std::vector<std::string> parts;
  for (int s = 0; s < 3; ++s) {
    for (int c = 0; c < 4; ++c) {
      const int n = scene.count(s, c);
      if (n > 0) parts.push_back(std::to_string(n) + " " + kColors[c] + " " + plural(s, n));
    }
  }
  if (parts.empty()) return "The image is empty.";
  std::string out =
      (parts.size() == 1 && parts[0][0] == '1' && parts[0][1] == ' ') ? "There is " : "There are ";
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += i + 1 == parts.size() ? " and " : ", ";
    out += parts[i];
  }
  return out + ".";
}

std::vector<QuestionAnswer> perception_questions(const Scene& scene, uint64_t seed, int count) {
  std::mt19937_64 rng(seed * 0xD1B54A32D192ED03ull + 5);
  std::vector<std::pair<int, int>> present;  // (color, shape)
  for (int s = 0; s < 3; ++s) {
    for (int c = 0; c < 4; ++c) {
      if (scene.count(s, c) > 0) present.emplace_back(c, s);
    }
  }
  std::vector<QuestionAnswer> out;
  while (static_cast<int>(out.size()) < count) {
    const int kind = pick(rng, 10);
    int c = pick(rng, 4), s = pick(rng, 3);
    if (!present.empty() && pick(rng, 10) < 7)
      std::tie(c, s) = present[pick(rng, static_cast<int>(present.size()))];
    const std::string cs = std::string(kColors[c]) + " " + kShapes[s] + "s";
    switch (kind) {
      case 0:
      case 1:
      case 2: {
        static const char* forms[] = {"How many %s are there?", "Count the %s.",
                                      "How many %s are in the image?", "What is the number of %s?"};
        std::string q = forms[pick(rng, 4)];
        q.replace(q.find("%s"), 2, cs);
        out.push_back({q, std::to_string(scene.count(s, c)), "count"});
        break;
      }
      case 3:
        out.push_back({"How many " + std::string(kShapes[s]) + "s are there?",
                       std::to_string(scene.count(s)), "count"});
        break;
      case 4:
        out.push_back({"How many " + std::string(kColors[c]) + " objects are there?",
                       std::to_string(scene.count(-1, c)), "count"});
        break;
      case 5:
        out.push_back(
            {"How many objects are there?", std::to_string(scene.objects.size()), "count"});
        break;
      case 6:
        out.push_back({"Is there a " + pair_name(c, s) + "?", scene.count(s, c) > 0 ? "yes" : "no",
                       "exists"});
        break;
      case 7: {
        const int size = pick(rng, 2);
        if (scene.count(s, -1, size) != 1) break;
        for (const SceneObject& o : scene.objects) {
          if (o.shape == s && o.size == size) {
            out.push_back(
                {"What color is the " + std::string(kSizes[size]) + " " + kShapes[s] + "?",
                 kColors[o.color], "color"});
          }
        }
        break;
      }
      case 8: {
        if (scene.count(-1, c) != 1) break;
        for (const SceneObject& o : scene.objects) {
          if (o.color == c)
            out.push_back({"What shape is the " + std::string(kColors[c]) + " object?",
                           kShapes[o.shape], "shape"});
        }
        break;
      }
      default:
        out.push_back({"Describe the image.", caption(scene), "caption"});
        break;
    }
  }
  return out;
}

std::string option_letter(int index) { return std::string(1, static_cast<char>('A' + index)); }

std::vector<ReasoningItem> reasoning_questions(const Scene& scene, uint64_t seed, int count) {
  std::mt19937_64 rng(seed * 0xA24BAED4963EE407ull + 11);
  std::vector<std::pair<int, int>> present;
  for (int s = 0; s < 3; ++s) {
    for (int c = 0; c < 4; ++c) {
      if (scene.count(s, c) > 0) present.emplace_back(c, s);
    }
  }
  std::vector<ReasoningItem> out;
  for (int attempt = 0; attempt < 200 && static_cast<int>(out.size()) < count; ++attempt) {
    if (present.empty()) break;
    auto [c1, s1] = present[pick(rng, static_cast<int>(present.size()))];
    int c2 = pick(rng, 4), s2 = pick(rng, 3);
    if (c1 == c2 && s1 == s2) continue;
    int a = scene.count(s1, c1), b = scene.count(s2, c2);
    if (a < b) {
      std::swap(a, b);
      std::swap(c1, c2);
      std::swap(s1, s2);
    }
    const std::string p1 = std::string(kColors[c1]) + " " + kShapes[s1] + "s";
    const std::string p2 = std::string(kColors[c2]) + " " + kShapes[s2] + "s";
    ReasoningItem item;
    int answer = 0;
    const int kind = pick(rng, 4);
    if (kind == 0) {
      item.kind = "difference";
      item.question = "How many more " + p1 + " than " + p2 + " are there?";
      answer = a - b;
      item.steps = std::to_string(a) + " " + p1 + " - " + std::to_string(b) + " " + p2 + " = " +
                   std::to_string(answer);
    } else if (kind == 1) {
      item.kind = "sum";
      item.question = "How many " + p1 + " and " + p2 + " are there altogether?";
      answer = a + b;
      item.steps = std::to_string(a) + " + " + std::to_string(b) + " = " + std::to_string(answer);
    } else if (kind == 2) {
      const int s3 = pick(rng, 3);
      const int n3 = scene.count(s3);
      item.kind = "difference_times";
      item.question = "How many more " + p1 + " than " + p2 + " are there, times the number of " +
                      kShapes[s3] + "s?";
      answer = (a - b) * n3;
      item.steps = "(" + std::to_string(a) + " - " + std::to_string(b) + ") x " +
                   std::to_string(n3) + " " + kShapes[s3] + "s = " + std::to_string(answer);
    } else {
      const int s3 = pick(rng, 3);
      item.kind = "remaining";
      item.question =
          std::string("If every ") + kShapes[s3] + " were removed, how many objects would remain?";
      answer = static_cast<int>(scene.objects.size()) - scene.count(s3);
      item.steps = std::to_string(scene.objects.size()) + " objects - " +
                   std::to_string(scene.count(s3)) + " " + kShapes[s3] +
                   "s = " + std::to_string(answer);
    }
    // Four distinct non-negative options: the answer and near misses.
    std::set<int> values = {answer};
    const int deltas[] = {1, -1, 2, -2, 3, 4, -3, 5};
    std::vector<int> candidates;
    for (int d : deltas) {
      if (answer + d >= 0) candidates.push_back(answer + d);
    }
    while (values.size() < 4) {
      values.insert(candidates[pick(rng, static_cast<int>(candidates.size()))]);
    }
    std::vector<int> order(values.begin(), values.end());
    for (int i = 3; i > 0; --i) std::swap(order[i], order[pick(rng, i + 1)]);
    for (int i = 0; i < 4; ++i) {
      item.options.push_back(std::to_string(order[i]));
      if (order[i] == answer) item.answer = i;
    }
    out.push_back(item);
  }
  return out;
}

}  // namespace tessera::reason
