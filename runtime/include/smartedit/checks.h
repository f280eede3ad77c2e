// Checks at the runtime's boundary, shared by the library and the tool: no NaN or inf goes into (or comes out of) a
// graph unnoticed. Bad input (std::invalid_argument) is what the caller can fix, exit status 2 in the tool; a
// non-finite result of the run (std::runtime_error) is a failed run, exit status 1 (smartedit/errors.py).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace smartedit {

// How many NaN and inf values a floating-point tensor holds, as "3 NaN and 1 inf values" (empty when none; integer
// tensors are always finite).
std::string non_finite_summary(const at::Tensor& t);

// std::invalid_argument naming `what` when the input `t` holds NaN or inf
void check_finite_input(const at::Tensor& t, const std::string& what);

// std::runtime_error naming `what` when the result `t` holds NaN or inf
void check_finite_result(const at::Tensor& t, const std::string& what);

}  // namespace smartedit
