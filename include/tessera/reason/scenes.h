// tessera/reason/scenes.h — rendered scenes of coloured shapes with their
// ground truth: perception questions and captions to train a small
// vision-language model on, and multi-step visual-reasoning questions
// (held out from training) to evaluate ProReason on.
//
// A scene is a 64 x 64 (by default) image of 2-7 non-overlapping shapes
// (circle, square, triangle) in four colours and two sizes on a light
// background, drawn with 4x4 supersampling so that edges are anti-aliased.
// Everything is a pure function of the seed.
//
//   tessera::reason::Scene s = tessera::reason::make_scene(42);
//   tessera::nn::Image img = tessera::reason::render_scene(s);
//   for (auto& qa : tessera::reason::perception_questions(s, 42)) ...
//   auto items = tessera::reason::reasoning_questions(s, 42, 2);
//
// Thread safety: pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/nn/image.h"

namespace tessera::reason {

inline constexpr const char* kShapes[] = {"circle", "square", "triangle"};
inline constexpr const char* kColors[] = {"red", "green", "blue", "yellow"};
inline constexpr const char* kSizes[] = {"small", "large"};

struct SceneObject {
  int shape = 0;        // index into kShapes
  int color = 0;        // index into kColors
  int size = 0;         // index into kSizes
  double x = 0, y = 0;  // centre, pixels
};

struct SceneOptions {
  int64_t image_size = 64;
  int min_objects = 2;
  int max_objects = 7;
};

struct Scene {
  int64_t image_size = 64;
  std::vector<SceneObject> objects;

  // Objects matching the filters (-1: any).
  int count(int shape = -1, int color = -1, int size = -1) const;
};

// A scene drawn from `seed`. InvalidArgument for options out of range
// (image_size < 32, objects outside [1, 12] or min > max).
Scene make_scene(uint64_t seed, const SceneOptions& options = {});
nn::Image render_scene(const Scene& scene);

// One question with its ground-truth answer.
struct QuestionAnswer {
  std::string question;
  std::string answer;
  std::string kind;  // "count", "exists", "color", "shape", "caption"
};

// Single-fact perception questions about the scene in several phrasings
// (counts of a colour-shape pair, a shape, a colour, all objects; yes/no
// existence; the colour or shape of a unique object) plus the caption
// request ("Describe the image."), drawn from `seed`. Used to train the
// vision expert.
std::vector<QuestionAnswer> perception_questions(const Scene& scene, uint64_t seed, int count = 8);
// "There are 2 red circles, 1 large blue square and 1 small green
// triangle." — every colour-shape group with its count, in a fixed order.
std::string caption(const Scene& scene);

// A multiple-choice question that needs perception and arithmetic.
struct ReasoningItem {
  std::string question;
  std::vector<std::string> options;  // four numbers as text
  int answer = 0;                    // index into options
  std::string kind;                  // "difference", "sum", "difference_times", "remaining"
  std::string steps;                 // the ground-truth derivation, for reports
};
// `count` questions about the scene (templates never used in training):
// differences and sums of two colour-shape counts, "(a - b) times the
// number of <shape>s", and "objects left when every <shape> is removed".
std::vector<ReasoningItem> reasoning_questions(const Scene& scene, uint64_t seed, int count = 2);

// "A", "B", ... for option i.
std::string option_letter(int index);

}  // namespace tessera::reason
