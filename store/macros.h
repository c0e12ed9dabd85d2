// Early-return helpers for Status / Result<T> inside the store's .cpp files.
// Private to store/: not part of any contract.
#pragma once

#define STORE_RETURN_IF_ERROR(expr) \
  do {                              \
    ::rpoint::Status _st = (expr);  \
    if (!_st.ok()) return _st;      \
  } while (0)

#define STORE_CONCAT_INNER(a, b) a##b
#define STORE_CONCAT(a, b) STORE_CONCAT_INNER(a, b)

// Declares `lhs` from a Result<T> expression, or returns its Status.
#define STORE_ASSIGN_OR_RETURN(lhs, expr)                                                 \
  auto STORE_CONCAT(_res_, __LINE__) = (expr);                                            \
  if (!STORE_CONCAT(_res_, __LINE__).ok()) return STORE_CONCAT(_res_, __LINE__).status(); \
  lhs = std::move(STORE_CONCAT(_res_, __LINE__)).value()
