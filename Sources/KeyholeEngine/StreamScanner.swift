import NIOCore

/// One decided piece of a scanned stream.
enum StreamItem {
    /// Bytes with no placeholder in them: a slice of the input, never a copy.
    case data(ByteBuffer)
    /// A placeholder (or value) occupying `length` input bytes.
    case match(secret: Int, form: PlaceholderForm, length: Int)
}

/// What a `StreamScanner` looks for: candidates found fast, each decided from at most
/// `lookahead` bytes.
protocol StreamMatcher: Sendable {
    var lookahead: Int { get }
    /// The next position from `from` that may start a match (`previous`: the byte before
    /// the buffer, nil at the start of a site).
    func nextPlausibleCandidate(in bytes: UnsafeRawBufferPointer, from: Int, previous: UInt8?) -> Int?
    func match(_ bytes: UnsafeRawBufferPointer, at start: Int, previous: UInt8?, final: Bool) -> PlaceholderMatcher.Result
}

extension PlaceholderMatcher: StreamMatcher {}

/// Scans a byte stream that arrives in arbitrary pieces for placeholders (or, on the way
/// back, real values), deciding every
/// byte exactly once and forwarding placeholder-free runs as slices of the input.
///
/// A candidate near the end of what has arrived is held back until enough bytes follow to
/// decide it (at most `PlaceholderMatcher.lookahead`), so a placeholder split across reads,
/// TLS records or chunks is found. The decision never depends on how the input was split.
struct StreamScanner<Matcher: StreamMatcher> {
    let matcher: Matcher
    private var pending: [ByteBuffer] = []
    /// Bytes of `pending[0]` before this offset are known not to start a placeholder.
    private var scanOffset = 0
    /// The last byte decided (for the token boundary before a placeholder).
    private(set) var previous: UInt8?
    /// Stream position of the first undecided byte.
    private(set) var position = 0
    /// Input bytes copied into scratch space to decide candidates split across pieces.
    private(set) var scratchBytes = 0

    /// Keep the bytes of each match in `matchedBytes` (response masking rebuilds base64
    /// from them).
    let captures: Bool
    /// The bytes of each match not yet taken, in order, when `captures`.
    private var matchedBytes: [[UInt8]] = []

    init(matcher: Matcher, captures: Bool = false) {
        self.matcher = matcher
        self.captures = captures
    }

    /// Hands over the captured bytes of the matches drained so far, in order.
    mutating func takeMatchedBytes() -> [[UInt8]] {
        defer { matchedBytes.removeAll(keepingCapacity: true) }
        return matchedBytes
    }

    var pendingByteCount: Int { pending.reduce(0) { $0 + $1.readableBytes } }

    /// The bytes not yet decided (at most a candidate's lookahead after a drain).
    var undecidedBytes: [UInt8] { pending.flatMap { Array($0.readableBytesView) } }

    /// Gives back the capacity of the scratch arrays when they hold nothing (a quiet
    /// connection).
    mutating func releaseIdleCapacity() {
        if pending.isEmpty { pending = [] }
        if matchedBytes.isEmpty { matchedBytes = [] }
    }

    /// A new site starts (a request body): the byte before it is no token boundary.
    mutating func startSite() {
        previous = nil
    }

    mutating func append(_ buffer: ByteBuffer) {
        if buffer.readableBytes > 0 { pending.append(buffer) }
    }

    /// Decides as much as possible; with `final`, everything.
    mutating func drain(final: Bool, into items: inout [StreamItem]) {
        while !pending.isEmpty {
            let buffer = pending[0]
            let from = scanOffset
            let before = previous
            let candidate = buffer.withUnsafeReadableBytes { matcher.nextPlausibleCandidate(in: $0, from: from, previous: before) }
            guard let c = candidate else {
                emitData(buffer, into: &items)
                pending.removeFirst()
                scanOffset = 0
                continue
            }
            let isLastPiece = pending.count == 1
            let available = buffer.readableBytes - c
            let result: PlaceholderMatcher.Result
            if available >= matcher.lookahead || isLastPiece {
                let prior = previous
                result = buffer.withUnsafeReadableBytes { bytes in
                    matcher.match(bytes, at: c, previous: c > 0 ? bytes[c - 1] : prior, final: final && isLastPiece)
                }
            } else {
                // The candidate straddles pieces: decide it on a small copy of the bytes around it.
                var scratch: [UInt8] = []
                scratch.reserveCapacity(matcher.lookahead)
                buffer.withUnsafeReadableBytes { scratch.append(contentsOf: $0[c...]) }
                var consumedAll = true
                for next in pending.dropFirst() {
                    let need = matcher.lookahead - scratch.count
                    if need <= 0 {
                        consumedAll = false
                        break
                    }
                    next.withUnsafeReadableBytes { scratch.append(contentsOf: $0.prefix(need)) }
                    if next.readableBytes > need { consumedAll = false }
                }
                scratchBytes += scratch.count
                let prior = c > 0 ? buffer.getInteger(at: buffer.readerIndex + c - 1, as: UInt8.self) : previous
                result = scratch.withUnsafeBytes {
                    matcher.match($0, at: 0, previous: prior, final: final && consumedAll)
                }
            }
            switch result {
            case .none:
                scanOffset = c + 1
            case .needMore:
                splitOff(c, into: &items)
                return
            case .match(let secret, let form, let length):
                splitOff(c, into: &items)
                items.append(.match(secret: secret, form: form, length: length))
                consume(length)
            }
        }
    }

    private mutating func emitData(_ buffer: ByteBuffer, into items: inout [StreamItem]) {
        guard buffer.readableBytes > 0 else { return }
        previous = buffer.getInteger(at: buffer.writerIndex - 1, as: UInt8.self)
        position += buffer.readableBytes
        items.append(.data(buffer))
    }

    /// Emits the first `count` bytes of `pending[0]` as data; the rest stays pending.
    private mutating func splitOff(_ count: Int, into items: inout [StreamItem]) {
        if count > 0 {
            let head = pending[0].getSlice(at: pending[0].readerIndex, length: count)!
            emitData(head, into: &items)
            pending[0].moveReaderIndex(forwardBy: count)
        }
        scanOffset = 0
    }

    /// Drops `count` bytes (a matched placeholder) from the front of `pending`.
    private mutating func consume(_ count: Int) {
        if captures {
            var bytes: [UInt8] = []
            bytes.reserveCapacity(count)
            for piece in pending where bytes.count < count {
                piece.withUnsafeReadableBytes { bytes.append(contentsOf: $0.prefix(count - bytes.count)) }
            }
            matchedBytes.append(bytes)
        }
        var remaining = count
        while remaining > 0, !pending.isEmpty {
            let available = pending[0].readableBytes
            if available <= remaining {
                remaining -= available
                previous = pending[0].getInteger(at: pending[0].writerIndex - 1, as: UInt8.self)
                pending.removeFirst()
            } else {
                previous = pending[0].getInteger(at: pending[0].readerIndex + remaining - 1, as: UInt8.self)
                pending[0].moveReaderIndex(forwardBy: remaining)
                remaining = 0
            }
        }
        position += count
        scanOffset = 0
    }
}
