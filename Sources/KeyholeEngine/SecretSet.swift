public import KeyholePolicy
import NIOCore

/// A policy's secrets compiled once for all the connections that run under it: each
/// secret's bytes and encoded values, the placeholders' matcher (requests) and the values'
/// matcher (responses, every form and base64 alignment).
///
/// Immutable, so connections share it. Building it per connection cost a few per cent of
/// a new connection's CPU with one secret and grows with every secret; a shared one also
/// keeps its tables warm in cache across a loop's connections and leaves fewer copies of
/// the values' encoded forms on the heap. The proxy keeps one per event loop and policy
/// reload (`PolicyStore.snapshot(on:)`), so loops never touch each other's reference
/// counts.
public final class SecretSet: Sendable {
    public let secrets: [CompiledSecret]
    let placeholders: PlaceholderMatcher
    let values: ValueMatcher
    /// Per secret, the value as headers and bodies carry it, and percent-encoded.
    let rawValues: [ByteBuffer]
    let percentValues: [ByteBuffer]

    public init(_ secrets: [Secret]) {
        let compiled = secrets.map(CompiledSecret.init)
        self.secrets = compiled
        placeholders = PlaceholderMatcher(placeholders: compiled.map(\.placeholder))
        values = ValueMatcher(values: compiled.map(\.raw))
        rawValues = compiled.map { ByteBuffer(bytes: $0.raw) }
        percentValues = compiled.map { ByteBuffer(bytes: $0.percentEncoded) }
    }
}
