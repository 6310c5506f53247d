import NIOCore

/// The scanned part of a response stream, with the framing bytes between its pieces:
/// content (`scan`) is searched for values across any split, framing (`pass`: chunk-size
/// lines, WebSocket frame headers) is not, and each framing piece goes out only once every
/// content byte before it has been decided, so the guest gets the bytes in their order.
///
/// Replacements keep the length (`ValueMatcher.fit`), so the framing stays true.
struct MaskingStream {
    var scanner: StreamScanner<ValueMatcher>
    /// Framing bytes waiting for the content before them (`at`: content bytes before them).
    var outbox = CircularBuffer<(at: Int, bytes: ByteBuffer)>(initialCapacity: 1)
    /// Content bytes given to the scanner.
    var scanned = 0
    /// Content bytes decided and emitted.
    var emitted = 0
    /// What a drain decided, kept between drains for its capacity (no allocation per response).
    private var items: [StreamItem] = []

    init(matcher: ValueMatcher) {
        scanner = StreamScanner(matcher: matcher, captures: true)
    }

    /// Gives back scratch capacity when nothing is pending (a quiet connection).
    mutating func releaseIdleCapacity() {
        guard outbox.isEmpty, scanned == emitted else { return }
        outbox = CircularBuffer(initialCapacity: 1)
        items = []
        scanner.releaseIdleCapacity()
    }

    mutating func scan(_ bytes: ByteBuffer) {
        scanner.append(bytes)
        scanned += bytes.readableBytes
    }

    mutating func pass(_ bytes: ByteBuffer) {
        outbox.append((scanned, bytes))
    }

    /// Whether a value may run through `framing`: begun in the undecided content before it
    /// and continued in it, or begun in it and cut off at its end. Content is scanned
    /// without its framing (so a value split across chunks or frames is found), which would
    /// miss a value spelled partly by framing bytes; such a response is refused instead.
    /// Call after a drain, so what is undecided does not depend on how input was split.
    func mayCarryValue(through framing: ByteBuffer) -> Bool {
        let tail = scanner.undecidedBytes
        let joined = tail + Array(framing.readableBytesView)
        return joined.withUnsafeBytes { b in
            for start in 0..<b.count {
                switch scanner.matcher.match(b, at: start, previous: nil, final: false) {
                case .none: continue
                case .needMore: return true  // runs to the end of the framing
                case .match(_, _, let length): if start + length > tail.count { return true }  // ends inside the framing
                }
            }
            return false
        }
    }

    mutating func drain(final: Bool, site: MaskSite, secrets: [CompiledSecret], into output: inout MaskOutput) {
        var items: [StreamItem] = []
        swap(&items, &self.items)
        defer {
            items.removeAll(keepingCapacity: true)
            swap(&items, &self.items)
        }
        scanner.drain(final: final, into: &items)
        var matched = scanner.takeMatchedBytes()[...]
        for item in items {
            release(&output)
            switch item {
            case .data(let slice):
                output.guest.append(slice)
                emitted += slice.readableBytes
            case .match(let secret, let form, let length):
                let original = matched.popFirst() ?? []
                let replacement: [UInt8]
                if form == .base64 {
                    replacement = scanner.matcher.maskBase64(original, secret: secret, filler: secrets[secret].placeholder)
                } else {
                    replacement = ValueMatcher.fit(secrets[secret].placeholder, to: length)
                }
                // Framing inside the match (a chunk boundary, a frame header) keeps its place.
                let start = emitted
                var offset = 0
                while offset < length {
                    var cut = length
                    if let next = outbox.first, next.at - start < length { cut = max(offset, next.at - start) }
                    if cut > offset {
                        output.guest.append(ByteBuffer(bytes: replacement[offset..<cut]))
                        emitted = start + cut
                        offset = cut
                    }
                    release(&output)
                }
                output.events.append(.masked(secret: secrets[secret].env, site: site, form: form))
            }
        }
        release(&output)
    }

    /// Framing whose content before it is all out.
    private mutating func release(_ output: inout MaskOutput) {
        while let first = outbox.first, first.at <= emitted {
            output.guest.append(outbox.removeFirst().bytes)
        }
    }
}
