#include "smartedit/checks.h"

#include <stdexcept>

namespace smartedit {

std::string non_finite_summary(const at::Tensor& t) {
  if (!t.defined() || !at::isFloatingType(t.scalar_type()) || t.numel() == 0) return "";
  if (at::isfinite(t).all().item<bool>()) return "";  // one pass in the common case
  const int64_t nan = at::isnan(t).sum().item<int64_t>(), inf = at::isinf(t).sum().item<int64_t>();
  return std::to_string(nan) + " NaN and " + std::to_string(inf) + " inf values (of " + std::to_string(t.numel()) +
         ")";
}

void check_finite_input(const at::Tensor& t, const std::string& what) {
  const std::string bad = non_finite_summary(t);
  if (!bad.empty()) throw std::invalid_argument(what + " holds " + bad + ": refused, it would only make NaN images");
}

void check_finite_result(const at::Tensor& t, const std::string& what) {
  const std::string bad = non_finite_summary(t);
  if (!bad.empty()) throw std::runtime_error(what + " holds " + bad + ": no image written");
}

}  // namespace smartedit
