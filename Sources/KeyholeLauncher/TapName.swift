/// Interface names for a sandbox's TAP device.
///
/// Deterministic in the sandbox name, so that a TAP left behind by a crashed run is found and
/// replaced at the next start; distinct for distinct names thanks to a short hash; and within
/// the kernel's 15-character limit (IFNAMSIZ - 1).
public enum TapName {
    public static let maximumLength = 15

    public static func forSandbox(_ name: String) -> String {
        let cleaned = name.lowercased().unicodeScalars
            .map { scalar -> Character in
                let c = Character(scalar)
                return (c.isASCII && (c.isLetter || c.isNumber)) ? c : "-"
            }
        let stem = String(cleaned.prefix(7))
        return "kh" + stem + "-" + hash4(name)
    }

    /// FNV-1a folded to 4 hex digits: stable across runs and processes (unlike `Hasher`).
    static func hash4(_ text: String) -> String {
        var hash: UInt32 = 0x811C_9DC5
        for byte in text.utf8 {
            hash ^= UInt32(byte)
            hash = hash &* 0x0100_0193
        }
        let folded = (hash >> 16) ^ (hash & 0xFFFF)
        let hex = String(folded, radix: 16)
        return String(repeating: "0", count: 4 - hex.count) + hex
    }
}
