#include "tessera/core/base64.h"

#include <gtest/gtest.h>

#include <string>

#include "tessera/core/error.h"

namespace tessera {
namespace {

// RFC 4648 section 10's test vectors.
TEST(Base64, Rfc4648Vectors) {
  const std::pair<std::string, std::string> vectors[] = {{"", ""},
                                                         {"f", "Zg=="},
                                                         {"fo", "Zm8="},
                                                         {"foo", "Zm9v"},
                                                         {"foob", "Zm9vYg=="},
                                                         {"fooba", "Zm9vYmE="},
                                                         {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, encoded] : vectors) {
    EXPECT_EQ(base64_encode(plain), encoded);
    EXPECT_EQ(base64_decode(encoded), plain);
  }
  EXPECT_EQ(base64_decode("Zm8"), "fo");  // unpadded
}

TEST(Base64, EveryByteValueRoundTrips) {
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  for (size_t n = 0; n <= all.size(); n += 37) {
    const std::string part = all.substr(all.size() - n);
    EXPECT_EQ(base64_decode(base64_encode(part)), part) << n;
  }
  EXPECT_EQ(base64_encode("\xff\xfe"), "//4=");
}

TEST(Base64, MalformedInputIsNamed) {
  auto message = [](const std::string& text) {
    try {
      base64_decode(text, "messages[0].content[1]");
    } catch (const InvalidArgument& e) {
      return e.message();
    }
    return std::string("no error");
  };
  EXPECT_EQ(message("Zm9v!mFy"),
            "messages[0].content[1]: character 4 is not in the base64 alphabet");
  EXPECT_NE(message("Zm9 vYmF").find("character 3"), std::string::npos);
  EXPECT_NE(message("Zm9vY").find("truncated"), std::string::npos);
  EXPECT_NE(message("Zm9=").find("non-zero bits"),
            std::string::npos);  // 'Z','m','9' -> 'f','o' + bits
  EXPECT_NE(message("Zm8==").find("padding"), std::string::npos);
  EXPECT_NE(message("Zg=a").find("alphabet"), std::string::npos);
}

}  // namespace
}  // namespace tessera
