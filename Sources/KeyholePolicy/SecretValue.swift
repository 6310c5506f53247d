/// A real credential. It lives on the host only; every textual form of it is a redaction,
/// so it cannot leak through string interpolation, `print`, `dump`, logs or errors.
/// Code that must put the bytes on the wire reads `withUnsafeBytes` / `bytes` explicitly.
public struct SecretValue: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible,
    CustomReflectable
{
    public static let redaction = "<redacted>"

    /// The raw bytes of the credential. Named plainly so every use is easy to audit.
    public let bytes: [UInt8]

    public init(bytes: [UInt8]) {
        self.bytes = bytes
    }

    public init(_ string: String) {
        self.bytes = Array(string.utf8)
    }

    public var count: Int { bytes.count }

    /// Whether the value occurs in `text` (a guard against it reaching the guest through a
    /// placeholder, an environment variable or a command).
    public func occurs(in text: some StringProtocol) -> Bool {
        PolicyReader.contains(Array(text.utf8), bytes)
    }

    public var description: String { Self.redaction }
    public var debugDescription: String { Self.redaction }
    public var customMirror: Mirror { Mirror(self, children: [], displayStyle: .struct) }
}
