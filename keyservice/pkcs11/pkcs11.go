// Package pkcs11 is the keyservice backend for PKCS#11 tokens (HSMs,
// SoftHSM2): it wraps local KEKs with CKM_AES_GCM under a non-extractable,
// sensitive AES key that never leaves the token.
//
// The key URI follows RFC 7512 (see URI). The key ID names the token and key
// object (see keyIdentity), so Unwrap finds the object that wrapped a value
// even after the URI's current key has moved on to a newer one.
package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	p11 "github.com/miekg/pkcs11"

	"github.com/kubekms/kubekms/keyservice"
)

const (
	kekSize    = 32
	ivSize     = 12
	tagBits    = 128
	formatV1   = 0x01
	wrappedLen = 1 + ivSize + kekSize + tagBits/8

	maxLabelBytes  = 128
	maxKeyObjects  = 64
	maxCachedKeys  = 64
	aadDomain      = "kubekms pkcs11 wrap v1"
	findBatchCount = 16
)

// Service is a keyservice.Service backed by one AES key on a PKCS#11 token.
type Service struct {
	uri  *URI
	mod  *module
	log  *slog.Logger
	opts keyservice.Options
	sem  chan struct{} // bounds open sessions

	mu        sync.Mutex
	slot      uint
	slotGen   uint64 // module generation the slot was found in; 0: find it again
	token     tokenRef
	idle      []p11.SessionHandle // all from generation slotGen
	handles   map[string]cachedHandle
	unhealthy bool
	closed    bool
	closeOnce sync.Once
}

type tokenRef struct{ label, serial string }

type cachedHandle struct {
	h   p11.ObjectHandle
	gen uint64
}

var _ keyservice.Opener = Open

// Open parses uri, loads its module and checks its PIN source. It does not
// need the token to be present: Probe says whether the key is usable.
func Open(ctx context.Context, uri string, opts keyservice.Options) (keyservice.Service, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, fmt.Errorf("parse PKCS#11 key URI: %w", err)
	}
	return OpenURI(ctx, u, opts)
}

// OpenURI is Open for a parsed URI.
func OpenURI(_ context.Context, u *URI, opts keyservice.Options) (*Service, error) {
	if _, err := u.PIN.Read(); err != nil {
		return nil, fmt.Errorf("PIN source: %w", err)
	}
	mod, err := acquireModule(u.ModulePath)
	if err != nil {
		return nil, err
	}
	s := &Service{
		uri:     u,
		mod:     mod,
		log:     opts.LoggerOrDiscard().With("backend", "pkcs11", "key_uri", u.String()),
		opts:    opts,
		sem:     make(chan struct{}, u.MaxSessions),
		handles: map[string]cachedHandle{},
	}
	return s, nil
}

// Probe looks the current key up (no cryptographic operation) and returns its
// key ID.
func (s *Service) Probe(ctx context.Context) (string, error) {
	var id string
	err := s.run(ctx, "probe", func(c *call) error {
		k, err := c.currentKey()
		if err != nil {
			return err
		}
		id = k.id.KeyID()
		return nil
	})
	return id, err
}

// Wrap encrypts a 32-byte local KEK with CKM_AES_GCM under the current key.
// The result is formatV1 || IV || ciphertext || tag; the AAD binds the key ID
// (and the cluster name, if set).
func (s *Service) Wrap(ctx context.Context, plaintext []byte) (keyservice.WrapResult, error) {
	if len(plaintext) != kekSize {
		return keyservice.WrapResult{}, keyservice.Invalid("wrap", fmt.Errorf("plaintext is %d bytes, want a %d-byte local KEK", len(plaintext), kekSize))
	}
	var res keyservice.WrapResult
	err := s.run(ctx, "wrap", func(c *call) error {
		k, err := c.currentKey()
		if err != nil {
			return err
		}
		keyID := k.id.KeyID()
		iv := make([]byte, ivSize)
		if _, err := rand.Read(iv); err != nil {
			return fmt.Errorf("IV: %w", err)
		}
		params := p11.NewGCMParams(iv, s.aad(keyID), tagBits)
		mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
		defer params.Free()
		if err := c.ctx().EncryptInit(c.h, mech, k.h); err != nil {
			return fmt.Errorf("C_EncryptInit: %w", err)
		}
		ct, err := c.ctx().Encrypt(c.h, plaintext)
		if err != nil {
			return fmt.Errorf("C_Encrypt: %w", err)
		}
		// Some tokens choose the IV themselves and write it back.
		if used := params.IV(); len(used) == ivSize {
			iv = used
		}
		if len(ct) != kekSize+tagBits/8 {
			return fmt.Errorf("C_Encrypt returned %d bytes, want %d", len(ct), kekSize+tagBits/8)
		}
		out := make([]byte, 0, wrappedLen)
		out = append(out, formatV1)
		out = append(out, iv...)
		res = keyservice.WrapResult{Wrapped: append(out, ct...), KeyID: keyID}
		return nil
	})
	return res, err
}

// Unwrap decrypts a value Wrap returned, with the key object keyID names,
// which need not be the current one.
func (s *Service) Unwrap(ctx context.Context, keyID string, wrapped []byte) ([]byte, error) {
	ref, err := parseKeyID(keyID)
	if err != nil {
		return nil, keyservice.Invalid("unwrap", err)
	}
	if len(wrapped) != wrappedLen || wrapped[0] != formatV1 {
		return nil, keyservice.Invalid("unwrap", fmt.Errorf("wrapped key is %d bytes or has an unknown format, want %d bytes of format %d", len(wrapped), wrappedLen, formatV1))
	}
	var plaintext []byte
	err = s.run(ctx, "unwrap", func(c *call) error {
		h, err := c.keyByRef(keyID, ref)
		if err != nil {
			return err
		}
		params := p11.NewGCMParams(bytes.Clone(wrapped[1:1+ivSize]), s.aad(keyID), tagBits)
		mech := []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}
		defer params.Free()
		if err := c.ctx().DecryptInit(c.h, mech, h); err != nil {
			return fmt.Errorf("C_DecryptInit: %w", err)
		}
		pt, err := c.ctx().Decrypt(c.h, wrapped[1+ivSize:])
		if err != nil {
			return c.decryptFailed(err)
		}
		if len(pt) != kekSize {
			clear(pt)
			return keyservice.Invalid("unwrap", fmt.Errorf("unwrapped key is %d bytes, want %d", len(pt), kekSize))
		}
		plaintext = pt
		return nil
	})
	return plaintext, err
}

// CheckKeyID looks the key object behind an older key ID up on the token
// (C_FindObjects and attribute reads, no crypto), bypassing the handle cache:
// once an operator deletes an old key, the plugin drops the local KEKs it
// wrapped within its revocation bound (keyservice.VersionChecker).
func (s *Service) CheckKeyID(ctx context.Context, keyID string) error {
	ref, err := parseKeyID(keyID)
	if err != nil {
		return keyservice.Invalid("check", err)
	}
	return s.run(ctx, "check", func(c *call) error {
		s.mu.Lock()
		delete(s.handles, keyID)
		s.mu.Unlock()
		_, err := c.keyByRef(keyID, ref)
		return err
	})
}

// Close closes this service's sessions and releases the module.
func (s *Service) Close() error {
	s.closeOnce.Do(func() {
		s.mod.mu.RLock()
		s.mu.Lock()
		s.closed = true
		if s.slotGen == s.mod.generation() {
			for _, h := range s.idle {
				_ = s.mod.ctx.CloseSession(h)
			}
		}
		s.idle = nil
		s.mu.Unlock()
		s.mod.mu.RUnlock()
		s.mod.release()
	})
	return nil
}

func (s *Service) aad(keyID string) []byte {
	return []byte(aadDomain + "\x00" + keyID + "\x00" + s.opts.ClusterName)
}

// run runs fn on a pooled session. On a token, session or handle failure it
// recovers (reopens sessions, finds the token again, forgets handles) and
// retries once, then classifies what is left.
func (s *Service) run(ctx context.Context, op string, fn func(*call) error) error {
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		if err = ctx.Err(); err != nil {
			return keyservice.Transient(op, err)
		}
		var gen uint64
		gen, err = s.attempt(ctx, op, fn)
		if err == nil {
			s.setHealthy(true, nil)
			return nil
		}
		var classified *keyservice.Error
		if errors.As(err, &classified) {
			if classified.Class != keyservice.ClassTransient {
				s.setHealthy(true, nil)
			}
			return err
		}
		switch classifyFailure(err) {
		case failToken:
			s.recoverToken(gen, err)
		case failHandle:
			s.forgetHandles()
		case failLogin:
			s.dropSessions()
		default:
			attempt = 2 // no recovery helps
		}
	}
	return s.classify(op, err)
}

func (s *Service) classify(op string, err error) error {
	switch classifyFailure(err) {
	case failToken:
		err = fmt.Errorf("token %s in module %s is not present or not responding; sessions will be reopened on the next call: %w",
			s.tokenDesc(), s.uri.ModulePath, err)
		s.setHealthy(false, err)
		return keyservice.Transient(op, err)
	case failHandle:
		return keyservice.Revoked(op, fmt.Errorf("key object is gone: %w", err))
	case failLogin:
		return keyservice.Revoked(op, fmt.Errorf("token %s: not logged in after logging in again: %w", s.tokenDesc(), err))
	case failDenied:
		return keyservice.Revoked(op, fmt.Errorf("token %s: access denied (check the PIN from %s): %w", s.tokenDesc(), s.uri.PIN, err))
	case failBadInput:
		return keyservice.Invalid(op, err)
	}
	return fmt.Errorf("key service %s: %w", op, err)
}

func (s *Service) tokenDesc() string {
	u := s.uri
	switch {
	case u.TokenLabel != "":
		return fmt.Sprintf("%q", u.TokenLabel)
	case u.TokenSerial != "":
		return fmt.Sprintf("serial %q", u.TokenSerial)
	default:
		return fmt.Sprintf("in slot %d", u.SlotID)
	}
}

// setHealthy logs transitions between a usable and an unreachable token.
func (s *Service) setHealthy(ok bool, cause error) {
	s.mu.Lock()
	was := !s.unhealthy
	s.unhealthy = !ok
	s.mu.Unlock()
	switch {
	case was && !ok:
		s.log.Warn("PKCS#11 token unavailable", "err", cause)
	case !was && ok:
		s.log.Info("PKCS#11 token available again")
	}
}

// attempt borrows a session (bounded by s.sem), runs fn on it and returns the
// session to the pool, or closes it if anything failed (a failed call may
// leave an operation active on it). It returns the module generation it ran
// in, for recovery.
func (s *Service) attempt(ctx context.Context, op string, fn func(*call) error) (uint64, error) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	defer func() { <-s.sem }()
	s.mod.mu.RLock()
	defer s.mod.mu.RUnlock()
	gen := s.mod.generation()
	h, slot, tok, err := s.session(gen)
	if err != nil {
		return gen, err
	}
	err = fn(&call{s: s, op: op, h: h, slot: slot, tok: tok, gen: gen})
	s.mu.Lock()
	if err == nil && !s.closed && s.slotGen == gen {
		s.idle = append(s.idle, h)
		h = 0
	}
	s.mu.Unlock()
	if h != 0 {
		_ = s.mod.ctx.CloseSession(h)
	}
	return gen, err
}

// session returns an idle session or opens and logs in a new one, with the
// slot and token it belongs to. Called under mod.mu.RLock.
func (s *Service) session(gen uint64) (p11.SessionHandle, uint, tokenRef, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return 0, 0, tokenRef{}, errors.New("PKCS#11 key service is closed")
	}
	if s.slotGen != gen {
		// Idle sessions are from an older generation: dead, and their
		// handle numbers may belong to someone else now.
		s.idle = nil
		clear(s.handles)
		slot, tok, err := s.findSlot()
		if err != nil {
			s.mu.Unlock()
			return 0, 0, tokenRef{}, err
		}
		s.slot, s.token, s.slotGen = slot, tok, gen
	}
	slot, tok := s.slot, s.token
	if n := len(s.idle); n > 0 {
		h := s.idle[n-1]
		s.idle = s.idle[:n-1]
		s.mu.Unlock()
		return h, slot, tok, nil
	}
	s.mu.Unlock()

	h, err := s.mod.ctx.OpenSession(slot, p11.CKF_SERIAL_SESSION)
	if err != nil {
		return 0, 0, tokenRef{}, fmt.Errorf("C_OpenSession: %w", err)
	}
	if err := s.login(h); err != nil {
		_ = s.mod.ctx.CloseSession(h)
		return 0, 0, tokenRef{}, err
	}
	return h, slot, tok, nil
}

// login logs the token in unless it already is (login is per token for the
// whole process, so another session may have done it). The PIN is read on
// every login, so an operator can change it without a restart.
func (s *Service) login(h p11.SessionHandle) error {
	info, err := s.mod.ctx.GetSessionInfo(h)
	if err != nil {
		return fmt.Errorf("C_GetSessionInfo: %w", err)
	}
	if info.State != p11.CKS_RO_PUBLIC_SESSION && info.State != p11.CKS_RW_PUBLIC_SESSION {
		return nil
	}
	pin, err := s.uri.PIN.Read()
	if err != nil {
		return fmt.Errorf("log in: %w", err)
	}
	err = s.mod.ctx.Login(h, p11.CKU_USER, pin)
	if err != nil && !errors.Is(err, p11.Error(p11.CKR_USER_ALREADY_LOGGED_IN)) {
		return fmt.Errorf("C_Login: %w", err)
	}
	return nil
}

// findSlot finds the one slot whose token matches the URI. Called under
// mod.mu.RLock and s.mu.
func (s *Service) findSlot() (uint, tokenRef, error) {
	u := s.uri
	slots, err := s.mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, tokenRef{}, fmt.Errorf("C_GetSlotList: %w", err)
	}
	var found []uint
	var tok tokenRef
	for _, slot := range slots {
		if u.HasSlotID && slot != u.SlotID {
			continue
		}
		ti, err := s.mod.ctx.GetTokenInfo(slot)
		if err != nil {
			continue // a token being removed; not ours to judge
		}
		if ti.Flags&p11.CKF_TOKEN_INITIALIZED == 0 ||
			u.TokenLabel != "" && ti.Label != u.TokenLabel ||
			u.TokenSerial != "" && ti.SerialNumber != u.TokenSerial ||
			u.TokenManufacturer != "" && ti.ManufacturerID != u.TokenManufacturer ||
			u.TokenModel != "" && ti.Model != u.TokenModel {
			continue
		}
		found = append(found, slot)
		tok = tokenRef{label: ti.Label, serial: ti.SerialNumber}
	}
	switch len(found) {
	case 0:
		return 0, tokenRef{}, fmt.Errorf("no slot of %d holds it: %w", len(slots), errTokenAbsent)
	case 1:
		return found[0], tok, nil
	default:
		return 0, tokenRef{}, fmt.Errorf("%d tokens match the key URI (slots %v); add serial= or slot-id=", len(found), found)
	}
}

// recoverToken drops all sessions and makes the next call find the token
// again. If the token is not listed (or not answering), the module is
// re-initialized, rate-limited: real HSM modules list a re-inserted token by
// themselves, but SoftHSM2 only rescans its token directory in C_Initialize.
func (s *Service) recoverToken(gen uint64, cause error) {
	s.dropSessions()
	if gen != 0 && (errors.Is(cause, errTokenAbsent) || errors.Is(cause, p11.Error(p11.CKR_CRYPTOKI_NOT_INITIALIZED))) {
		if err := s.mod.reinit(gen); err != nil {
			s.log.Warn("PKCS#11 module re-initialization failed", "err", err)
		}
	}
}

// dropSessions makes the next call re-find the slot and open new sessions.
// Sessions of the current generation are closed then, under the module lock.
func (s *Service) dropSessions() {
	s.mod.mu.RLock()
	defer s.mod.mu.RUnlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.slotGen == s.mod.generation() {
		for _, h := range s.idle {
			_ = s.mod.ctx.CloseSession(h)
		}
	}
	s.idle = nil
	s.slotGen = 0
	clear(s.handles)
}

func (s *Service) forgetHandles() {
	s.mu.Lock()
	clear(s.handles)
	s.mu.Unlock()
}

// call is one attempt on one borrowed session.
type call struct {
	s    *Service
	op   string
	h    p11.SessionHandle
	slot uint
	tok  tokenRef
	gen  uint64
}

func (c *call) ctx() *p11.Ctx { return c.s.mod.ctx }

// keyObject is a found AES key.
type keyObject struct {
	h           p11.ObjectHandle
	id          keyIdentity
	sensitive   bool
	extractable bool
}

// currentKey finds the key the URI names now: the object with the URI's id,
// or else the one with the highest CKA_ID among those with its label.
func (c *call) currentKey() (keyObject, error) {
	u := c.s.uri
	var label *string
	if u.ObjectLabel != "" {
		label = &u.ObjectLabel
	}
	var id []byte
	if u.HasID {
		id = u.ID
	}
	objs, err := c.findKeys(label, id)
	if err != nil {
		return keyObject{}, err
	}
	if len(objs) == 0 {
		return keyObject{}, c.notFound("no AES secret key matches the key URI")
	}
	best := objs[0]
	tie := false
	for _, o := range objs[1:] {
		switch d := compareID(o.id.ID, best.id.ID); {
		case d > 0:
			best, tie = o, false
		case d == 0:
			tie = true
		}
	}
	if tie {
		return keyObject{}, fmt.Errorf("several AES keys on token %s share the highest CKA_ID %x; give each key version its own id", c.s.tokenDesc(), best.id.ID)
	}
	if !best.sensitive || best.extractable {
		return keyObject{}, fmt.Errorf("refusing AES key %q (CKA_ID %x): it must be sensitive and non-extractable (create it with --sensitive and without --extractable)", best.id.Label, best.id.ID)
	}
	c.s.cacheHandle(best.id.KeyID(), best.h, c.gen)
	return best, nil
}

// keyByRef finds the key object a key ID names, from the cache or by label,
// id and fingerprint.
func (c *call) keyByRef(keyID string, ref keyRef) (p11.ObjectHandle, error) {
	s := c.s
	tok := c.tok
	s.mu.Lock()
	ch, ok := s.handles[keyID]
	s.mu.Unlock()
	if ref.TokenLabel != tok.label || ref.TokenSerial != tok.serial {
		return 0, keyservice.Revoked("unwrap", fmt.Errorf("the key ID names token %q (serial %q), but this service uses token %q (serial %q)", ref.TokenLabel, ref.TokenSerial, tok.label, tok.serial))
	}
	if ok && ch.gen == c.gen {
		return ch.h, nil
	}
	objs, err := c.findKeys(&ref.Label, ref.ID)
	if err != nil {
		return 0, err
	}
	for _, o := range objs {
		if ref.matches(o.id) {
			s.cacheHandle(keyID, o.h, c.gen)
			return o.h, nil
		}
	}
	return 0, c.notFound(fmt.Sprintf("the key that wrapped this value (object %q, CKA_ID %x) is no longer on the token (deleted, or re-created with other key bytes)", ref.Label, ref.ID))
}

func (s *Service) cacheHandle(keyID string, h p11.ObjectHandle, gen uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.handles) >= maxCachedKeys {
		clear(s.handles)
	}
	s.handles[keyID] = cachedHandle{h: h, gen: gen}
}

// notFound tells a key that is gone (Revoked) from a token that stopped
// answering: SoftHSM2 finds nothing, without an error, once its token
// directory has vanished; and a logged-out session sees no private keys.
func (c *call) notFound(msg string) error {
	if _, err := c.ctx().GetTokenInfo(c.slot); err != nil {
		return fmt.Errorf("C_GetTokenInfo: %w", err)
	}
	info, err := c.ctx().GetSessionInfo(c.h)
	if err != nil {
		return fmt.Errorf("C_GetSessionInfo: %w", err)
	}
	if info.State == p11.CKS_RO_PUBLIC_SESSION || info.State == p11.CKS_RW_PUBLIC_SESSION {
		return fmt.Errorf("session lost its login: %w", p11.Error(p11.CKR_USER_NOT_LOGGED_IN))
	}
	return keyservice.Revoked(c.op, fmt.Errorf("token %s: %s", c.s.tokenDesc(), msg))
}

// decryptFailed classifies a failed C_Decrypt: SoftHSM2 reports a wrong GCM
// tag as CKR_GENERAL_ERROR, which also means "device gone", so a general
// error counts as bad input only while the token still answers.
func (c *call) decryptFailed(err error) error {
	err = fmt.Errorf("C_Decrypt: %w", err)
	switch {
	case classifyFailure(err) == failBadInput:
	case errors.Is(err, p11.Error(p11.CKR_GENERAL_ERROR)):
		if _, terr := c.ctx().GetTokenInfo(c.slot); terr != nil {
			return err
		}
	default:
		return err
	}
	return keyservice.Invalid("unwrap", fmt.Errorf("the token rejected the wrapped key (authentication failed: tampered, or wrapped for another key or cluster): %w", err))
}

var (
	attrsBasic = []*p11.Attribute{
		p11.NewAttribute(p11.CKA_LABEL, nil),
		p11.NewAttribute(p11.CKA_ID, nil),
		p11.NewAttribute(p11.CKA_SENSITIVE, nil),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
	}
	// ckaUniqueID is PKCS#11 3.0's CKA_UNIQUE_ID, which miekg/pkcs11 lacks.
	ckaUniqueID uint = 0x4
)

// findKeys lists the AES secret keys with the given label (nil: any) and
// CKA_ID (nil: any), with the attributes that identify them.
func (c *call) findKeys(label *string, id []byte) ([]keyObject, error) {
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
	}
	if label != nil {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_LABEL, *label))
	}
	if id != nil {
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, id))
	}
	ctx := c.ctx()
	if err := ctx.FindObjectsInit(c.h, tmpl); err != nil {
		return nil, fmt.Errorf("C_FindObjectsInit: %w", err)
	}
	var handles []p11.ObjectHandle
	for {
		hs, _, err := ctx.FindObjects(c.h, findBatchCount)
		if err != nil {
			_ = ctx.FindObjectsFinal(c.h)
			return nil, fmt.Errorf("C_FindObjects: %w", err)
		}
		handles = append(handles, hs...)
		if len(hs) == 0 || len(handles) > maxKeyObjects {
			break
		}
	}
	if err := ctx.FindObjectsFinal(c.h); err != nil {
		return nil, fmt.Errorf("C_FindObjectsFinal: %w", err)
	}
	if len(handles) > maxKeyObjects {
		return nil, fmt.Errorf("more than %d AES keys match; delete old key versions", maxKeyObjects)
	}
	objs := make([]keyObject, 0, len(handles))
	for _, h := range handles {
		attrs, err := ctx.GetAttributeValue(c.h, h, attrsBasic)
		if err != nil {
			return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
		}
		o := keyObject{h: h, id: keyIdentity{
			TokenLabel:  c.tok.label,
			TokenSerial: c.tok.serial,
			Label:       string(attrs[0].Value),
			ID:          attrs[1].Value,
		}}
		o.sensitive = isTrue(attrs[2].Value)
		o.extractable = isTrue(attrs[3].Value)
		if len(o.id.Label) > maxLabelBytes || len(o.id.ID) > maxIDBytes {
			return nil, fmt.Errorf("AES key with a CKA_LABEL over %d bytes or a CKA_ID over %d bytes is not supported", maxLabelBytes, maxIDBytes)
		}
		if o.id.CheckValue, err = c.optionalAttr(h, p11.CKA_CHECK_VALUE); err != nil {
			return nil, err
		}
		if o.id.UniqueID, err = c.optionalAttr(h, ckaUniqueID); err != nil {
			return nil, err
		}
		objs = append(objs, o)
	}
	return objs, nil
}

// optionalAttr reads an attribute a token may not support; nil if it does not.
func (c *call) optionalAttr(h p11.ObjectHandle, typ uint) ([]byte, error) {
	attrs, err := c.ctx().GetAttributeValue(c.h, h, []*p11.Attribute{p11.NewAttribute(typ, nil)})
	switch {
	case errors.Is(err, p11.Error(p11.CKR_ATTRIBUTE_TYPE_INVALID)), errors.Is(err, p11.Error(p11.CKR_ATTRIBUTE_SENSITIVE)):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("C_GetAttributeValue: %w", err)
	case len(attrs) != 1:
		return nil, nil
	}
	return attrs[0].Value, nil
}

func isTrue(v []byte) bool { return len(v) > 0 && v[0] != 0 }
