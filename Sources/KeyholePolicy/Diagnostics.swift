/// A position in a policy file, 1-based, as editors count it. Line 0 means a policy given
/// without a file (a command-line flag, the SDK): `file` then names that origin alone.
public struct SourceLocation: Sendable, Hashable, CustomStringConvertible {
    public var file: String
    public var line: Int
    public var column: Int

    public init(file: String, line: Int, column: Int) {
        self.file = file
        self.line = line
        self.column = column
    }

    public var description: String { line == 0 ? file : "\(file):\(line):\(column)" }
}

/// One problem found in a policy file. Messages never contain a secret's real value.
public struct PolicyDiagnostic: Sendable, Hashable, CustomStringConvertible {
    public enum Severity: Sendable, Hashable {
        case error
        case warning
    }

    public var location: SourceLocation
    public var severity: Severity
    public var message: String

    public init(_ location: SourceLocation, _ message: String, severity: Severity = .error) {
        self.location = location
        self.message = message
        self.severity = severity
    }

    /// `FILE:LINE:COL: message` (warnings carry a `warning:` prefix before the message).
    public var description: String {
        switch severity {
        case .error: return "\(location): \(message)"
        case .warning: return "\(location): warning: \(message)"
        }
    }
}

/// The error type of `KeyholePolicy`.
public enum PolicyError: Error, Sendable, CustomStringConvertible {
    /// The file could not be used; every problem found is listed, in file order.
    case invalid([PolicyDiagnostic])

    public var diagnostics: [PolicyDiagnostic] {
        switch self {
        case .invalid(let diagnostics): return diagnostics
        }
    }

    public var description: String {
        diagnostics.map(\.description).joined(separator: "\n")
    }
}

/// Suggests the closest known word for a misspelt key ("did you mean …?").
enum Suggestion {
    static func closest(to word: String, in candidates: [String]) -> String? {
        let lowered = word.lowercased()
        var best: (String, Int)?
        for candidate in candidates {
            let distance = editDistance(Array(lowered.utf8), Array(candidate.utf8))
            if best == nil || distance < best!.1 {
                best = (candidate, distance)
            }
        }
        guard let (candidate, distance) = best else { return nil }
        // Accept roughly one typo per three characters; beyond that a hint misleads.
        let limit = max(2, candidate.utf8.count / 3)
        if distance <= limit { return candidate }
        // `allowhosts` / `allow-hosts`: same letters once separators are ignored.
        let strip = { (s: String) in s.lowercased().filter { $0 != "_" && $0 != "-" } }
        return candidates.first { strip($0) == strip(word) }
    }

    /// Optimal-string-alignment distance: insertions, deletions, substitutions and
    /// adjacent transpositions ("hsot" is one typo away from "host").
    static func editDistance(_ a: [UInt8], _ b: [UInt8]) -> Int {
        if a.isEmpty { return b.count }
        if b.isEmpty { return a.count }
        let width = b.count + 1
        var d = [Int](repeating: 0, count: (a.count + 1) * width)
        for i in 0...a.count { d[i * width] = i }
        for j in 0...b.count { d[j] = j }
        for i in 1...a.count {
            for j in 1...b.count {
                let cost = a[i - 1] == b[j - 1] ? 0 : 1
                var value = min(d[(i - 1) * width + j] + 1, d[i * width + j - 1] + 1, d[(i - 1) * width + j - 1] + cost)
                if i > 1, j > 1, a[i - 1] == b[j - 2], a[i - 2] == b[j - 1] {
                    value = min(value, d[(i - 2) * width + j - 2] + 1)
                }
                d[i * width + j] = value
            }
        }
        return d[a.count * width + b.count]
    }
}
