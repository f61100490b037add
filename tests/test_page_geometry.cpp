// White-box tests of the OCR service's geometry (src/ocr/page_geometry.hpp)
// and resolution rules (src/ocr/resolution.hpp); tests/test_ocr.cpp checks
// the same end to end on rendered pages.
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "ocr/page_geometry.hpp"
#include "ocr/resolution.hpp"

using namespace taskmgr::ocr;

namespace {

void check_box(const Box& b, int left, int top, int right, int bottom) {
  CHECK(b.left == left);
  CHECK(b.top == top);
  CHECK(b.right == right);
  CHECK(b.bottom == bottom);
}

}  // namespace

TEST_CASE("PageGeometry: a rescale maps pixel edges back by the ratio of the sizes") {
  PageGeometry g(1017, 529);
  CHECK(g.is_identity());
  check_box(g.to_source(Box{10, 20, 30, 40}), 10, 20, 30, 40);
  g.resize(4068, 2116);  // the user's page, scaled 4x
  CHECK_FALSE(g.is_identity());
  CHECK(g.scale_x() == 4);
  CHECK(g.scale_y() == 4);
  CHECK(g.width() == 4068);
  check_box(g.to_source(Box{0, 0, 4068, 2116}), 0, 0, 1017, 529);
  check_box(g.to_source(Box{400, 800, 1202, 1001}), 100, 200, 301, 250);  // 300.5, 250.25 rounded
  // Clamped to the source.
  check_box(g.to_source(Box{-8, -8, 5000, 3000}), 0, 0, 1017, 529);
}

TEST_CASE("PageGeometry: quarter turns (pixRotateOrth, clockwise) map back to the source") {
  // A 100 x 50 source; a box near its top left corner.
  const Box box{10, 5, 30, 15};
  PageGeometry one(100, 50);
  one.turn_clockwise(1);  // now 50 x 100: the source's top left is the top right
  CHECK(one.width() == 50);
  CHECK(one.height() == 100);
  // Turned clockwise, (x, y) went to (h - y, x): the box is at x 35..45, y 10..30.
  check_box(one.to_source(Box{35, 10, 45, 30}), box.left, box.top, box.right, box.bottom);
  PageGeometry two(100, 50);
  two.turn_clockwise(2);  // (x, y) -> (w - x, h - y)
  check_box(two.to_source(Box{70, 35, 90, 45}), box.left, box.top, box.right, box.bottom);
  PageGeometry three(100, 50);
  three.turn_clockwise(3);  // (x, y) -> (y, w - x)
  check_box(three.to_source(Box{5, 70, 15, 90}), box.left, box.top, box.right, box.bottom);
  CHECK(three.quarter_turns() == 3);
  // A turn, then a rescale of the turned page.
  PageGeometry both(100, 50);
  both.turn_clockwise(1);
  both.resize(100, 200);
  check_box(both.to_source(Box{70, 20, 90, 60}), box.left, box.top, box.right, box.bottom);
}

TEST_CASE("PageGeometry: a deskew rotation (cv::getRotationMatrix2D about the centre) maps back") {
  // OpenCV's matrix for 90 degrees about (50, 50) on a 100 x 100 image maps
  // pixel centres (x, y) -> (y, 100 - x). The source's corner (0, 0) is the
  // centre (-0.5, -0.5) less half a pixel; it lands at centre (-0.5, 100.5),
  // the edge point (0, 101).
  PageGeometry g(100, 100);
  g.rotate(90);
  const Point p = g.to_source(Point{0, 101});
  CHECK(p.x == doctest::Approx(0).epsilon(1e-9));
  CHECK(p.y == doctest::Approx(0).epsilon(1e-9));
  CHECK(g.rotation_degrees() == 90);
  // There and back: the identity.
  PageGeometry back(2550, 3300);
  back.rotate(3);
  back.rotate(-3);
  const Point q = back.to_source(Point{1234.5, 2345.25});
  CHECK(q.x == doctest::Approx(1234.5));
  CHECK(q.y == doctest::Approx(2345.25));
  // A small rotation grows a box to hold the turned rectangle.
  PageGeometry small(2550, 3300);
  small.rotate(3);
  const Box b = small.to_source(Box{1000, 1000, 1300, 1040});
  CHECK(b.right - b.left > 300);
  CHECK(b.bottom - b.top > 40);
}

TEST_CASE(
    "hOCR in source coordinates: boxes, baselines, sizes, scan_res, and textangle when turned") {
  const std::string hocr =
      "  <div class='ocr_page' id='page_1' title='image \"unknown\"; bbox 0 0 2550 3300; ppageno "
      "0; "
      "scan_res 300 300'>\n"
      "     <span class='ocr_line' id='line_1_1' title=\"bbox 158 156 470 202; baseline 0.003 -8; "
      "x_size 49.195675; x_descenders 10.195676; x_ascenders 10\">\n"
      "      <span class='ocrx_word' id='word_1_1' title='bbox 158 156 278 196; x_wconf 96'>Dear"
      "</span>\n";
  PageGeometry g(1275, 1650);
  g.resize(2550, 3300);
  const std::string out = hocr_to_source(hocr, g, 150);
  CHECK(out.find("title='image \"unknown\"; bbox 0 0 1275 1650; ppageno 0; scan_res 150 150'") !=
        std::string::npos);
  CHECK(out.find("title=\"bbox 79 78 235 101; baseline 0.003 -4; x_size 24.6; x_descenders 5.1; "
                 "x_ascenders 5\"") != std::string::npos);
  CHECK(out.find("title='bbox 79 78 139 98; x_wconf 96'>Dear</span>") != std::string::npos);
  // Unchanged around the titles.
  CHECK(out.find("<span class='ocrx_word' id='word_1_1' ") != std::string::npos);

  // Recognized turned a quarter clockwise (the source is 3300 x 2550): the
  // text runs up the source: textangle 90 for the baseline.
  PageGeometry turned(3300, 2550);
  turned.turn_clockwise(1);
  const std::string t = hocr_to_source(hocr, turned, 300);
  CHECK(t.find("bbox 0 0 3300 2550;") != std::string::npos);
  // Word (158, 156)-(278, 196) turned back: x = y, y = 2550 - x.
  CHECK(t.find("title='bbox 156 2272 196 2392; x_wconf 96'") != std::string::npos);
  CHECK(t.find("textangle 90; x_size 49.2;") != std::string::npos);
  CHECK(t.find("baseline") == std::string::npos);
}

TEST_CASE("ALTO and TSV in source coordinates") {
  const std::string alto =
      "\t\t<Page WIDTH=\"2448\" HEIGHT=\"3168\" PHYSICAL_IMG_NR=\"0\" ID=\"page_0\">\n"
      "\t\t\t<PrintSpace HPOS=\"0\" VPOS=\"0\" WIDTH=\"2448\" HEIGHT=\"3168\">\n"
      "\t\t\t\t\t\t\t<String ID=\"string_0\" HPOS=\"152\" VPOS=\"152\" WIDTH=\"104\" "
      "HEIGHT=\"40\" WC=\"0.67\" CONTENT=\"HPOS=&quot;1&quot;\"/><SP WIDTH=\"20\" VPOS=\"152\" "
      "HPOS=\"256\"/>\n";
  PageGeometry g(612, 792);
  g.resize(2448, 3168);
  const std::string out = alto_to_source(alto, g);
  CHECK(out.find("<Page WIDTH=\"612\" HEIGHT=\"792\" PHYSICAL_IMG_NR=\"0\" ID=\"page_0\">") !=
        std::string::npos);
  CHECK(out.find("<PrintSpace HPOS=\"0\" VPOS=\"0\" WIDTH=\"612\" HEIGHT=\"792\">") !=
        std::string::npos);
  CHECK(out.find("<String ID=\"string_0\" HPOS=\"38\" VPOS=\"38\" WIDTH=\"26\" HEIGHT=\"10\" "
                 "WC=\"0.67\" CONTENT=\"HPOS=&quot;1&quot;\"/>") != std::string::npos);
  CHECK(out.find("<SP WIDTH=\"5\" VPOS=\"38\" HPOS=\"64\"/>") != std::string::npos);

  const std::string tsv =
      "level\tpage_num\tblock_num\tpar_num\tline_num\tword_"
      "num\tleft\ttop\twidth\theight\tconf\ttext\n"
      "1\t1\t0\t0\t0\t0\t0\t0\t2448\t3168\t-1\t\n"
      "5\t1\t1\t1\t1\t1\t152\t152\t104\t40\t67.533333\tDew\n";
  const std::string t = tsv_to_source(tsv, g);
  CHECK(t ==
        "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\t"
        "conf\ttext\n"
        "1\t1\t0\t0\t0\t0\t0\t0\t612\t792\t-1\t\n"
        "5\t1\t1\t1\t1\t1\t38\t38\t26\t10\t67.533333\tDew\n");
}

TEST_CASE("resolution: a tag is believed unless missing or a writer's default") {
  for (int dpi : {0, 1, 72, 96, 10, 49, 5000}) {
    CAPTURE(dpi);
    CHECK_FALSE(believable_dpi(dpi));
  }
  for (int dpi : {50, 100, 150, 200, 204, 300, 600, 1200}) {
    CAPTURE(dpi);
    CHECK(believable_dpi(dpi));
  }
  CHECK(dpi_from_text_height(29) == 300);
  CHECK(dpi_from_text_height(14.5) == 150);
}

TEST_CASE("resolution: what each page is taken to be, and whether it is rescaled") {
  int measured = 0;
  auto height = [&measured](double h) {
    return [&measured, h] {
      ++measured;
      return h;
    };
  };
  // A believable tag: the text is never measured; rescaled to the target
  // when under 0.6 of it (180 dpi for 300), as an estimate is.
  PageResolution r = choose_resolution(150, false, 300, 0, height(29));
  CHECK(r.dpi == 150);
  CHECK(r.source == DpiSource::kFile);
  CHECK(r.scale == 2);
  r = choose_resolution(300, false, 300, 0, height(9));
  CHECK(r.scale == 1);
  r = choose_resolution(200, false, 300, 0, height(9));  // phototest's tag: read as it is
  CHECK(r.dpi == 200);
  CHECK(r.source == DpiSource::kFile);
  CHECK(r.scale == 1);
  r = choose_resolution(179, false, 300, 0, height(29));
  CHECK(r.scale == doctest::Approx(300 / 179.0));
  r = choose_resolution(180, false, 300, 0, height(29));
  CHECK(r.scale == 1);
  r = choose_resolution(400, false, 600, 0, height(29));  // the fraction is of the target
  CHECK(r.scale == 1);
  r = choose_resolution(300, false, 600, 0, height(29));
  CHECK(r.scale == 2);
  r = choose_resolution(50, false, 300, 0, height(29));
  CHECK(r.scale == 4);  // at most 4
  CHECK(measured == 0);
  // A PDF page at the dpi it was rendered at: known.
  r = choose_resolution(150, true, 300, 0, height(29));
  CHECK(r.source == DpiSource::kFile);
  CHECK(r.scale == 2);
  // Tagged 72 or untagged: measured. 12-point text at 300 dpi: not rescaled.
  r = choose_resolution(72, false, 300, 0, height(29));
  CHECK(measured == 1);
  CHECK(r.source == DpiSource::kEstimated);
  CHECK(r.dpi == 300);
  CHECK(r.scale == 1);
  r = choose_resolution(0, false, 300, 0, height(31));
  CHECK(r.source == DpiSource::kEstimated);
  CHECK(r.scale == 1);
  // Text of a 150 dpi page: rescaled to the target.
  r = choose_resolution(96, false, 300, 0, height(14.5));
  CHECK(r.source == DpiSource::kEstimated);
  CHECK(r.dpi == 150);
  CHECK(r.scale == doctest::Approx(2));
  // A shortfall the estimate cannot tell from a smaller font is left alone
  // (12-point text at 200 dpi); under 0.6 of the target, not.
  r = choose_resolution(0, false, 300, 0, height(29 * 200 / 300.0));
  CHECK(r.dpi == 200);
  CHECK(r.scale == 1);
  r = choose_resolution(0, false, 300, 0, height(29 * 170 / 300.0));
  CHECK(r.dpi == 170);
  CHECK(r.scale == doctest::Approx(300 / 170.0));
  // Components as small as text under 50 dpi: noise, not text. Assumed,
  // not rescaled (a photograph was read at 21 dpi x4: 70x the time).
  measured = 0;
  r = choose_resolution(0, false, 300, 0, height(4.5));
  CHECK(measured == 1);
  CHECK(r.source == DpiSource::kAssumed);
  CHECK(r.dpi == 300);
  CHECK(r.scale == 1);
  r = choose_resolution(72, false, 300, 0, height(29 * 50 / 300.0));
  CHECK(r.source == DpiSource::kEstimated);
  CHECK(r.dpi == 50);
  // Nothing to measure: assumed, the tag as it is (300 without one).
  r = choose_resolution(72, false, 300, 0, height(0));
  CHECK(r.source == DpiSource::kAssumed);
  CHECK(r.dpi == 72);
  CHECK(r.scale == 1);
  r = choose_resolution(0, false, 300, 0, height(0));
  CHECK(r.dpi == 300);
  CHECK(r.source == DpiSource::kAssumed);
  // target_dpi 0 or a forced scale: nothing measured, the tag taken as it is.
  measured = 0;
  r = choose_resolution(72, false, 0, 0, height(9));
  CHECK(r.source == DpiSource::kAssumed);
  CHECK(r.scale == 1);
  r = choose_resolution(150, false, 300, 2.5, height(9));
  CHECK(r.source == DpiSource::kFile);
  CHECK(r.scale == 2.5);
  CHECK(measured == 0);
  CHECK(std::string(dpi_source_name(DpiSource::kEstimated)) == "estimated");
}
