import CompressNIO
import NIOCore

/// Decodes a `gzip` or `deflate` response body as it streams, so masking can read it
/// (zlib through compress-nio). Output is bounded: a body that decodes to more than
/// `maxRatio` times its compressed size plus `slack` is refused (a decompression bomb).
final class BodyDecoder {
    static let maxRatio = 100
    static let slack = 1 << 20

    private let decompressor: any NIODecompressor
    private var compressed = 0
    private var decoded = 0
    private var ended = false
    private let allocator = ByteBufferAllocator()

    /// nil for any coding but gzip (x-gzip) or deflate alone.
    init?(coding: String) {
        switch coding {
        case "gzip", "x-gzip": decompressor = CompressionAlgorithm.gzip().decompressor
        case "deflate": decompressor = CompressionAlgorithm.zlib().decompressor  // RFC 9110: "deflate" is zlib
        default: return nil
        }
        do { try decompressor.startStream() } catch { return nil }
    }

    deinit {
        try? decompressor.finishStream()
    }

    struct Bomb: Error, CustomStringConvertible {
        var description: String { "the body decodes to more than \(BodyDecoder.maxRatio) times its size" }
    }

    struct TrailingData: Error, CustomStringConvertible {
        var description: String { "bytes after the end of the compressed stream" }
    }

    func decode(_ input: ByteBuffer) throws -> [ByteBuffer] {
        var input = input
        compressed += input.readableBytes
        var pieces: [ByteBuffer] = []
        while input.readableBytes > 0 {
            guard !ended else { throw TrailingData() }
            var out = allocator.buffer(capacity: 16 * 1024)
            let before = input.readableBytes
            var more = false
            do {
                try decompressor.streamInflate(from: &input, to: &out)
                // Consumed what it could: either all input, or the stream ended.
                if input.readableBytes > 0 { ended = true }
            } catch let error as CompressNIOError where error == .bufferOverflow {
                more = true  // the output filled up: go on with a fresh buffer
            } catch let error as CompressNIOError where error == .inputBufferOverflow {
                // needs more input
            }
            decoded += out.readableBytes
            guard decoded <= Self.maxRatio * compressed + Self.slack else { throw Bomb() }
            if out.readableBytes > 0 { pieces.append(out) }
            if !more, input.readableBytes == before { break }
        }
        return pieces
    }

    /// The body ended: whatever is left in the decoder.
    func finish() throws -> [ByteBuffer] {
        try decode(ByteBuffer())
    }
}
