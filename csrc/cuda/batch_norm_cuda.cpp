// Registers the CUDA kernels of every fastnn op.
#include <torch/library.h>

#include "batch_norm_cuda.h"

TORCH_LIBRARY_IMPL(fastnn, CUDA, m) {
  m.impl("batch_norm_train", &fastnn::cuda::batch_norm_train_cuda);
  m.impl("batch_norm_train_masked", &fastnn::cuda::batch_norm_train_masked_cuda);
  m.impl("batch_norm_eval", &fastnn::cuda::batch_norm_eval_cuda);
  m.impl("batch_norm_backward", &fastnn::cuda::batch_norm_backward_cuda);
  m.impl("batch_norm_dual", &fastnn::cuda::batch_norm_dual_cuda);
  m.impl("batch_norm_dual_masked", &fastnn::cuda::batch_norm_dual_masked_cuda);
  m.impl("batch_norm_dual_backward", &fastnn::cuda::batch_norm_dual_backward_cuda);
  m.impl("batch_norm_stats", &fastnn::cuda::batch_norm_stats_cuda);
  m.impl("batch_norm_train_with_stats", &fastnn::cuda::batch_norm_train_with_stats_cuda);
  m.impl("batch_norm_backward_reduce", &fastnn::cuda::batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elemt", &fastnn::cuda::batch_norm_backward_elemt_cuda);
  m.impl("batch_norm_cat_with_stats", &fastnn::cuda::batch_norm_cat_with_stats_cuda);
}
