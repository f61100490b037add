// Private to the OCR service: where the image Tesseract recognized lies in
// the source image. Each preprocessing step that moves pixels (a quarter
// turn after orientation detection, the rescale, the deskew rotation) is
// recorded as it is applied to the image; every coordinate the service
// returns is mapped back through them into the source's pixels.
//
// Coordinates are pixel edges, as Tesseract's boxes are: (0, 0) is the top
// left corner of the first pixel, (w, h) the bottom right corner of the
// last; a box's right and bottom are exclusive.
#pragma once

#include <string>

namespace taskmgr::ocr {

struct Point {
  double x = 0;
  double y = 0;
};

struct Box {
  int left = 0;
  int top = 0;
  int right = 0;   // exclusive
  int bottom = 0;  // exclusive
};

class PageGeometry {
 public:
  // The source image, before any step: the identity.
  PageGeometry(int source_width, int source_height);

  // The steps, in the order they are applied to the image.
  // pixRotateOrth(pix, quarter_turns): turned clockwise, quarter_turns 0..3.
  void turn_clockwise(int quarter_turns);
  // cv::resize to new_width x new_height (any interpolation: OpenCV maps
  // pixel edges to pixel edges by the ratio of the sizes).
  void resize(int new_width, int new_height);
  // cv::warpAffine with cv::getRotationMatrix2D((w / 2, h / 2), degrees, 1)
  // into an image of the same size: turned counter-clockwise by `degrees`
  // about the image's centre.
  void rotate(double degrees);

  int source_width() const { return source_width_; }
  int source_height() const { return source_height_; }
  // The image as it is after the steps so far (the one recognized).
  int width() const { return width_; }
  int height() const { return height_; }
  // What was applied: the clockwise quarter turns, the scale along the
  // recognized image's axes (1 = none), the rotation (counter-clockwise).
  int quarter_turns() const { return quarter_turns_; }
  double scale_x() const { return scale_x_; }
  double scale_y() const { return scale_y_; }
  double rotation_degrees() const { return rotation_degrees_; }
  // No step moved a pixel: recognized coordinates are the source's.
  bool is_identity() const {
    return quarter_turns_ == 0 && width_ == source_width_ && height_ == source_height_ &&
           rotation_degrees_ == 0;
  }

  // A point of the recognized image in the source's coordinates.
  Point to_source(Point p) const;
  // The source's box around the recognized box (the bounding box of its
  // four corners mapped back, rounded to whole pixels and clamped to the
  // source; a box turned by a deskew rotation grows to enclose the turned
  // rectangle).
  Box to_source(const Box& b) const;

 private:
  // x' = m[0] x + m[1] y + m[2], y' = m[3] x + m[4] y + m[5]: from the
  // source to the recognized image (forward) and back (inverse).
  void then(const double step[6]);
  int source_width_, source_height_;
  int width_, height_;
  int quarter_turns_ = 0;
  double scale_x_ = 1, scale_y_ = 1;
  double rotation_degrees_ = 0;
  double forward_[6] = {1, 0, 0, 0, 1, 0};
  double inverse_[6] = {1, 0, 0, 0, 1, 0};
};

// Tesseract's page outputs, rewritten into the source's coordinates through
// `g` (unchanged when `g` is the identity and the resolution is the one
// Tesseract was given).
//
// hOCR: every title's "bbox" and "x_bboxes"; a line's "baseline" (slope
// and offset from the bottom left of its mapped box) or, when the page was
// turned by quarter turns, "textangle" instead (counter-clockwise degrees of
// the text in the source, as Tesseract writes it for lines it reads
// turned); "x_size", "x_descenders", "x_ascenders" divided by the scale;
// "scan_res" set to `dpi`.
std::string hocr_to_source(const std::string& hocr, const PageGeometry& g, int dpi);
// ALTO: HPOS, VPOS, WIDTH, HEIGHT of every element; the Page's and the
// PrintSpace's are the source's size; an SP (a space, no HEIGHT) keeps its
// extent along the line as WIDTH.
std::string alto_to_source(const std::string& alto, const PageGeometry& g);
// TSV (Tesseract's columns: level, page, block, paragraph, line, word, left,
// top, width, height, confidence, text): left, top, width, height of each row
// (a header row, or any row whose first ten columns are not integers, is
// kept as it is).
std::string tsv_to_source(const std::string& tsv, const PageGeometry& g);

}  // namespace taskmgr::ocr
