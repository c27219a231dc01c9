/* Decodes one box of a JPEG with the system's libjpeg-turbo, skipping what lies outside it (utils/data/jpeg_box.py).

   Rows above the box are entropy-decoded but neither transformed nor upsampled (jpeg_skip_scanlines), rows below
   it are not read at all, and only the box's columns, widened to whole iMCUs, are transformed (jpeg_crop_scanline).
   Pixels are those of a full decode with the same library: the region starts at least MARGIN columns left of the
   box where the image allows, because fancy upsampling treats a cropped region's first column as an image edge.
   Any error or warning of libjpeg (a corrupt or truncated file) returns 1: the caller then decodes the whole file
   the ordinary way, which reads it or names it. */
#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE */
#include <string.h>
#include <jpeglib.h>

#define MARGIN 2

struct failure {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
};

static void fail(j_common_ptr info) { longjmp(((struct failure *)info->err)->jump, 1); }

static void warn(j_common_ptr info, int level) {
    if (level < 0) fail(info); /* level -1: corrupt data, which a full decode would report or repair */
}

/* Writes the image's height and width into dims, and with out, rows [top, top + height) and columns
   [left, left + width) of the RGB image into out, (height, width, 3), black where the box leaves the image (as
   PIL's crop). Returns 2 for a colour space that libjpeg cannot turn into RGB (CMYK, YCCK), 3 for a box of
   negative size. */
int jpeg_box(const unsigned char *data, unsigned long size, int *dims, int top, int left, int height, int width,
             unsigned char *out) {
    struct jpeg_decompress_struct info;
    struct failure failure;
    info.err = jpeg_std_error(&failure.manager);
    failure.manager.error_exit = fail;
    failure.manager.emit_message = warn;
    if (setjmp(failure.jump)) {
        jpeg_destroy_decompress(&info);
        return 1;
    }
    jpeg_create_decompress(&info);
    jpeg_mem_src(&info, data, size);
    jpeg_read_header(&info, TRUE);
    dims[0] = (int)info.image_height;
    dims[1] = (int)info.image_width;
    if (info.jpeg_color_space != JCS_GRAYSCALE && info.jpeg_color_space != JCS_YCbCr &&
        info.jpeg_color_space != JCS_RGB) {
        jpeg_destroy_decompress(&info);
        return 2;
    }
    if (out == NULL) {
        jpeg_destroy_decompress(&info);
        return 0;
    }
    if (height < 0 || width < 0) {
        jpeg_destroy_decompress(&info);
        return 3;
    }
    /* The part of the box inside the image, [y0, y1) x [x0, x1): only it is decoded, the rest stays black. */
    long y0 = top > 0 ? top : 0, x0 = left > 0 ? left : 0;
    long y1 = (long)top + height < dims[0] ? (long)top + height : dims[0];
    long x1 = (long)left + width < dims[1] ? (long)left + width : dims[1];
    size_t stride = (size_t)width * 3;
    memset(out, 0, (size_t)height * stride);
    if (y0 >= y1 || x0 >= x1) {
        jpeg_destroy_decompress(&info);
        return 0;
    }
    info.out_color_space = JCS_RGB;
    jpeg_start_decompress(&info);
    JDIMENSION first = x0 > MARGIN ? (JDIMENSION)(x0 - MARGIN) : 0;
    JDIMENSION end = (JDIMENSION)(x1 + MARGIN) < info.output_width ? (JDIMENSION)(x1 + MARGIN) : info.output_width;
    JDIMENSION span = end - first;
    if (span < info.output_width) jpeg_crop_scanline(&info, &first, &span); /* first moves left to an iMCU edge */
    /* After the crop, output_width is the cropped region's width: the row holds [first, first + output_width). */
    JSAMPARRAY row = (*info.mem->alloc_sarray)((j_common_ptr)&info, JPOOL_IMAGE, info.output_width * 3, 1);
    if (y0 > 0) jpeg_skip_scanlines(&info, (JDIMENSION)y0);
    size_t offset = (size_t)(x0 - (long)first) * 3, inside = (size_t)(x1 - x0) * 3;
    unsigned char *to = out + (size_t)(y0 - top) * stride + (size_t)(x0 - left) * 3;
    for (long y = y0; y < y1; y++, to += stride) {
        jpeg_read_scanlines(&info, row, 1);
        memcpy(to, row[0] + offset, inside);
    }
    jpeg_abort_decompress(&info); /* the rows below the box are never read */
    jpeg_destroy_decompress(&info);
    return 0;
}
