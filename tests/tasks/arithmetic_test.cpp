// The arithmetic toy task: deterministic questions, correct answers, and a
// checker that accepts exactly the right first number.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "tessera/tasks/arithmetic.h"

TEST(Arithmetic, ExamplesAndChecker) {
  auto a = tessera::tasks::arithmetic_examples(100, 1);
  auto b = tessera::tasks::arithmetic_examples(100, 1);
  ASSERT_EQ(a.size(), 100u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt, b[i].prompt);
    int x = 0, y = 0;
    char op = 0;
    ASSERT_EQ(std::sscanf(a[i].prompt.c_str(), "Q: %d%c%d=? A: ", &x, &op, &y), 3);
    EXPECT_EQ(std::to_string(op == '+' ? x + y : x - y), a[i].answer);
  }
  tessera::tasks::ArithmeticExample e{"Q: 2+3=? A: ", "5"};
  EXPECT_TRUE(tessera::tasks::arithmetic_correct(e, "5\nQ: 1+1"));
  EXPECT_TRUE(tessera::tasks::arithmetic_correct(e, " 5 apples"));
  EXPECT_FALSE(tessera::tasks::arithmetic_correct(e, "55"));
  EXPECT_FALSE(tessera::tasks::arithmetic_correct(e, "four"));
}

TEST(Arithmetic, PartialCreditScoresDigitsAndLength) {
  tessera::tasks::ArithmeticExample e{"Q: 37+48=? A: ", "85"};
  auto exact = tessera::tasks::score_arithmetic(e, " 85\nQ");
  EXPECT_TRUE(exact.exact && exact.last_digit && exact.length);
  auto units = tessera::tasks::score_arithmetic(e, "75");
  EXPECT_FALSE(units.exact);
  EXPECT_TRUE(units.last_digit && units.length);
  auto longer = tessera::tasks::score_arithmetic(e, "105");
  EXPECT_TRUE(longer.last_digit);
  EXPECT_FALSE(longer.length);
  auto none = tessera::tasks::score_arithmetic(e, "five");
  EXPECT_FALSE(none.exact || none.last_digit || none.length);
  tessera::tasks::ArithmeticExample neg{"Q: 3-8=? A: ", "-5"};
  EXPECT_FALSE(tessera::tasks::score_arithmetic(neg, "5").length);  // the sign counts
  EXPECT_TRUE(tessera::tasks::score_arithmetic(neg, "-5").exact);
}

TEST(Arithmetic, SmallConfigIsValidForBothFamilies) {
  auto dense = tessera::tasks::small_arithmetic_config(300);
  EXPECT_EQ(dense.model_type, "llama");
  EXPECT_EQ(dense.vocab_size, 300);
  EXPECT_EQ(dense.eos_token_ids, std::vector<int64_t>{299});
  dense.validate();
  auto moe = tessera::tasks::small_arithmetic_config(300, 4);
  EXPECT_EQ(moe.model_type, "mixtral");
  EXPECT_EQ(moe.num_experts, 4);
  moe.validate();
}
