#include <doctest/doctest.h>

#include <string>

#include "taskmgr/estimator.hpp"

using namespace taskmgr;

TEST_CASE("the linear model scales with pixels, bytes and batch size") {
  LinearMemoryModel m("m", {10, 1, 8, 2});
  RequestFeatures f;
  CHECK(m.estimate_mb(f) == doctest::Approx(11));  // base + one page
  f.pixels = 10'000'000;
  CHECK(m.estimate_mb(f) == doctest::Approx(10 + 1 + 80));
  f.pages = 4;
  f.batch_size = 2;  // two of the four pages held at once
  CHECK(m.estimate_mb(f) == doctest::Approx(10 + 2 * 81));
  f.batch_size = 8;  // never more than the pages there are
  CHECK(m.estimate_mb(f) == doctest::Approx(10 + 4 * 81));
}

TEST_CASE("an estimate explains itself") {
  MemoryEstimator e;
  RequestFeatures f;
  f.pixels = 2'000'000;
  f.bytes = 1 << 20;
  const MemoryEstimate est = e.estimate("ocr", f, "cpu");
  CHECK(est.mb >= 1);
  CHECK(est.model == "linear");
  CHECK(est.samples == 0);
  CHECK(est.correction == 1);
  CHECK(est.explanation().find("model linear") != std::string::npos);
  CHECK(est.explanation().find("pixels=2000000") != std::string::npos);
  CHECK(est.explanation().find("bytes=1048576") != std::string::npos);
  CHECK(est.explanation().find("-> " + std::to_string(est.mb) + " MB") != std::string::npos);
  CHECK(est.explanation().find("no task of about this size measured yet: the model's figure") !=
        std::string::npos);
}

TEST_CASE(
    "learning is per size class of the model's figure: an estimate uses its own class, or "
    "the nearest measured") {
  struct Fixed : MemoryModel {
    std::string name() const override { return "fixed"; }
    double estimate_mb(const RequestFeatures& f) const override {
      return static_cast<double>(f.pixels);
    }
  };
  CHECK(memory_size_class(1) == 0);
  CHECK(memory_size_class(100) == 6);   // 64-128 MB
  CHECK(memory_size_class(128) == 7);   // 128-256 MB
  CHECK(memory_size_class(1000) == 9);  // 512-1024 MB
  MemoryEstimator e;
  e.register_model("svc", std::make_shared<Fixed>());
  RequestFeatures small, large, between;
  small.pixels = 100;    // class 6
  large.pixels = 1000;   // class 9
  between.pixels = 400;  // class 8: nearer 9 than 6
  for (int i = 0; i < 10; ++i) {
    e.record_actual("svc", "cpu", small, 200);   // an engine's base: x2 on small inputs
    e.record_actual("svc", "cpu", large, 1000);  // x1 on large ones
  }
  const MemoryEstimate s = e.estimate("svc", small, "cpu");
  const MemoryEstimate l = e.estimate("svc", large, "cpu");
  const MemoryEstimate b = e.estimate("svc", between, "cpu");
  CHECK(s.mb == 200);
  CHECK(s.size_class == 6);
  CHECK(l.mb == 1000);
  CHECK(l.size_class == 9);
  CHECK(b.mb == 400);  // class 9's correction, x1
  CHECK(b.size_class == 9);
  CHECK(s.samples == 10);
  // Far from every measured class (more than two classes, a factor of 4,
  // from the nearest): the model's figure alone.
  RequestFeatures far;
  far.pixels = 8000;  // class 12: three from 9
  const MemoryEstimate f = e.estimate("svc", far, "cpu");
  CHECK(f.mb == 8000);
  CHECK(f.samples == 0);
  CHECK(f.explanation().find("no task of about this size measured yet") != std::string::npos);
  RequestFeatures near;
  near.pixels = 3000;  // class 11: two from 9
  CHECK(e.estimate("svc", near, "cpu").samples == 10);
  CHECK(s.explanation().find("learned correction x2 from 10 measured task(s) with a model figure "
                             "of 64-128 MB on cpu") != std::string::npos);
}

TEST_CASE("services supply their own model") {
  struct Fixed : MemoryModel {
    std::string name() const override { return "fixed"; }
    double estimate_mb(const RequestFeatures& f) const override {
      return 100.0 * static_cast<double>(f.batch_size);
    }
  };
  MemoryEstimator e;
  e.register_model("gpu-model", std::make_shared<Fixed>());
  RequestFeatures f;
  f.batch_size = 3;
  CHECK(e.estimate("gpu-model", f).mb == 300);
  CHECK(e.estimate("gpu-model", f).model == "fixed");
  CHECK(e.estimate("other", f).model == "linear");
}

TEST_CASE("estimates converge on measured actuals and err on the high side") {
  MemoryEstimator e;
  RequestFeatures f;
  f.pixels = 5'000'000;
  const double model = e.estimate("ocr", f, "cpu").model_mb;
  // The service really uses about 3x the model, with some noise.
  const std::int64_t actuals[] = {150, 160, 155, 158, 152, 161, 149, 157, 153, 159,
                                  156, 154, 158, 155, 157, 156, 154, 155, 157, 156};
  for (std::int64_t a : actuals) e.record_actual("ocr", "cpu", f, a);
  const MemoryEstimate est = e.estimate("ocr", f, "cpu");
  CHECK(est.samples == 20);
  CHECK(est.mb >= 156);  // not below what was seen typically
  CHECK(est.mb <= 175);  // and close to it
  CHECK(est.correction > 150 / model);
  CHECK(est.explanation().find("20 measured") != std::string::npos);

  // Overestimates shrink too.
  MemoryEstimator shrink;
  for (int i = 0; i < 20; ++i) shrink.record_actual("ocr", "cpu", f, 20);
  const MemoryEstimate small = shrink.estimate("ocr", f, "cpu");
  CHECK(small.mb >= 20);
  CHECK(small.mb <= 22);
}

TEST_CASE("learning is per device: before placement the most conservative applies") {
  MemoryEstimator e;
  RequestFeatures f;
  const double model = e.estimate("svc", f).model_mb;
  for (int i = 0; i < 10; ++i) {
    e.record_actual("svc", "cpu", f, static_cast<std::int64_t>(model));
    e.record_actual("svc", "cuda:0", f, static_cast<std::int64_t>(model * 4));
  }
  const auto cpu = e.estimate("svc", f, "cpu");
  const auto gpu = e.estimate("svc", f, "cuda:0");
  const auto any = e.estimate("svc", f, "");
  CHECK(gpu.mb > 3 * cpu.mb);
  CHECK(any.mb == gpu.mb);
  CHECK(e.estimate("svc", f, "cuda:1").samples == 0);
}

TEST_CASE("a replaced model is destroyed without the estimator's lock") {
  // A model is host code, its destructor too; here it asks the estimator.
  struct Calling : MemoryModel {
    MemoryEstimator* e = nullptr;
    bool* destroyed = nullptr;
    ~Calling() override {
      e->estimate("svc", RequestFeatures{});  // takes the estimator's lock
      *destroyed = true;
    }
    std::string name() const override { return "calling"; }
    double estimate_mb(const RequestFeatures&) const override { return 50; }
  };
  MemoryEstimator e;
  bool first_gone = false, second_gone = false;
  auto first = std::make_shared<Calling>();
  first->e = &e;
  first->destroyed = &first_gone;
  e.register_model("svc", std::move(first));
  auto second = std::make_shared<Calling>();
  second->e = &e;
  second->destroyed = &second_gone;
  e.register_model("svc", std::move(second));  // replaces the first
  CHECK(first_gone);
  CHECK(e.estimate("svc", RequestFeatures{}).model == "calling");
  e.register_model("svc", nullptr);  // removes the second
  CHECK(second_gone);
  CHECK(e.estimate("svc", RequestFeatures{}).model == "linear");
}
