;;; rlm-client.el --- The connection to the rlm daemon and its jobs  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.
;;; Commentary:

;; The library half of rlm.el, with no user interface: the socket and
;; the jsonrpc connection (NUL filtering included), starting the daemon
;; and keeping its log, requests, contexts sent from buffers, and the
;; protocol state of each query (`rlm-job'), updated by one small
;; handler per `query/event' kind.  Views (result buffers, Babel,
;; inserting at point) register two functions on a job, `on-event' and
;; `on-finish', and keep their own state.

;;; Code:

(require 'cl-lib)
(require 'jsonrpc)
(require 'subr-x)

(defgroup rlm nil
  "Ask a Recursive Language Model daemon (rlmd) about large texts."
  :group 'tools
  :prefix "rlm-"
  :link '(url-link :tag "Home page" "https://github.com/rlmd/rlmd"))

(defcustom rlm-socket-path nil
  "Unix socket of the rlm daemon.
nil means the daemon's own default, as computed by
`rlm-default-socket-path': $RLMD_SOCKET, else
$XDG_RUNTIME_DIR/rlmd/rlmd.sock, else /run/user/UID/rlmd/rlmd.sock,
else TMPDIR/runtime-UID/rlmd/rlmd.sock."
  :type '(choice (const :tag "The daemon's default" nil) file)
  :group 'rlm)

(defcustom rlm-daemon-command '("rlmd")
  "Command (a program and its arguments) that starts the daemon.
It runs when no daemon answers on the socket; \"--socket PATH\" is
appended.  nil means never start one."
  :type '(choice (const :tag "Never start the daemon" nil)
                 (repeat string))
  :group 'rlm)

(defcustom rlm-daemon-start-timeout 15
  "Seconds to wait for a daemon started by Emacs to answer."
  :type 'number
  :group 'rlm)

(defcustom rlm-request-timeout 30
  "Seconds to wait for short requests (status, contexts, cancel)."
  :type 'number
  :group 'rlm)

(defcustom rlm-put-timeout 300
  "Seconds to wait while the daemon stores a context (text or files)."
  :type 'number
  :group 'rlm)

(defcustom rlm-query-options nil
  "Default options of every query, a plist of the daemon's option names.
For example (:max_iterations 20 :max_depth 1 :timeout_s 600).
Per-call options override these."
  :type '(plist :key-type symbol :value-type sexp)
  :group 'rlm)
(defcustom rlm-file-transfer-threshold (* 1024 1024)
  "Texts of at least this many characters go to the daemon via a file.
Emacs writes them to a private temporary file that the daemon reads
\(much faster than sending them over the socket), then deletes it.
When the daemon cannot read the file (another machine or a private
/tmp), the text goes over the socket.  nil means always the socket."
  :type '(choice (const :tag "Always over the socket" nil) integer)
  :group 'rlm)

(defcustom rlm-events-buffer-size 0
  "Size of the jsonrpc events log buffer; 0 disables it.
Logging pretty-prints every message, contexts included, so keep it
small unless you debug the protocol."
  :type '(choice (const :tag "Unlimited" nil) integer)
  :group 'rlm)

(defcustom rlm-display-buffer-action
  '((display-buffer-reuse-window display-buffer-pop-up-window)
    (inhibit-same-window . t))
  "Action used by `display-buffer' to show a result buffer."
  :type 'sexp
  :group 'rlm)

(defcustom rlm-daemon-log-file
  (expand-file-name (format "rlmd-%d.log" (user-uid)) temporary-file-directory)
  "File receiving the output of a daemon Emacs starts.
The previous run's log is kept as FILE.old.  `rlm-daemon-log' shows it."
  :type 'file
  :group 'rlm)

(defcustom rlm-drop-contexts-on-kill t
  "Non-nil means killing a buffer drops the contexts Emacs sent from it."
  :type 'boolean
  :group 'rlm)

;;;; Errors

;; Emacs prints the data of an error with `prin1' (in quotes) unless its
;; conditions include `file-error', whose first datum is printed as the
;; message itself.  rlm errors are messages for people, so they take that
;; route; `user-error' keeps the debugger out of them.
(define-error 'rlm-error "rlm" '(user-error file-error))

(defun rlm--signal (format-string &rest args)
  "Signal `rlm-error' with the message FORMAT-STRING formatted with ARGS."
  (signal 'rlm-error (list (concat "rlm: " (apply #'format format-string args)))))

(defconst rlm-error-codes
  '((parse-error . -32700) (invalid-request . -32600) (method-not-found . -32601)
    (invalid-params . -32602) (internal-error . -32603)
    (app-error . -32000) (not-found . -32001) (bad-input . -32002)
    (model-error . -32003) (budget-exceeded . -32004) (cancelled . -32005)
    (unavailable . -32006) (shutting-down . -32007)
    ;; jsonrpc.el's own code for a connection that closed under a request.
    (connection-closed . -1))
  "JSON-RPC error codes of the daemon (rlmd/protocol/errors.py), by name.")

(defun rlm-error-code (name)
  "Return the JSON-RPC error code called NAME in `rlm-error-codes'."
  (or (alist-get name rlm-error-codes) (error "Unknown rlm error code %s" name)))

(defun rlm-error-is (err name)
  "Return non-nil if ERR, a JSON-RPC error plist, has the code NAME."
  (eql (plist-get err :code) (rlm-error-code name)))

;;;; State

(defvar rlm--connection nil
  "The jsonrpc connection to the daemon, or nil.")

(defvar rlm--daemon-process nil
  "The daemon process Emacs started last, or nil.")

(defvar rlm--jobs (make-hash-table :test #'equal)
  "Running jobs: job id (a string) to `rlm-job'.")

(defvar rlm--recent-jobs nil
  "Jobs of this session, newest first (for `rlm-trace').")

(defvar rlm--job-counter 0
  "Counter making job ids unique within this Emacs.")

(defvar rlm-question-history nil
  "Minibuffer history of questions.")

(defvar rlm-context-history nil
  "Minibuffer history of context names.")

(defun rlm--plist (&rest plist)
  "Return PLIST without the keys whose value is nil."
  (let (out)
    (while plist
      (when (cadr plist)
        (setq out (cons (cadr plist) (cons (car plist) out))))
      (setq plist (cddr plist)))
    (nreverse out)))

(defun rlm--merge-plists (&rest plists)
  "Merge PLISTS; later values win and nil values are dropped."
  (let (out)
    (dolist (pl plists)
      (while pl
        (setq out (plist-put out (car pl) (cadr pl)))
        (setq pl (cddr pl))))
    (apply #'rlm--plist out)))

(defun rlm--truncate (string width)
  "Return STRING on one line, cut to WIDTH characters."
  (truncate-string-to-width
   (replace-regexp-in-string "[\n\t ]+" " " (string-trim string))
   width nil nil "…"))

(defun rlm--format-count (n)
  "Return N with a k or M suffix when large."
  (cond ((not (numberp n)) "?")
        ((>= n 1000000) (format "%.1fM" (/ n 1e6)))
        ((>= n 1000) (format "%.1fk" (/ n 1e3)))
        (t (format "%d" n))))

(defun rlm--tokens-total (tokens)
  "Return a number of tokens from TOKENS, a number or an input/output plist."
  (cond ((numberp tokens) tokens)
        ((and (consp tokens) (keywordp (car tokens)))
         (+ (or (plist-get tokens :input) 0) (or (plist-get tokens :output) 0)))))


(defun rlm--plist-without (plist keys)
  "Return PLIST without KEYS."
  (let (out)
    (while plist
      (unless (memq (car plist) keys)
        (setq out (cons (cadr plist) (cons (car plist) out))))
      (setq plist (cddr plist)))
    (nreverse out)))

;;;; Jobs: the protocol state of one query

(defvar-local rlm--job nil
  "The job this buffer shows (in a result buffer: its latest).")

(cl-defstruct (rlm-job (:constructor rlm--job-create) (:copier nil))
  "One query sent to the daemon: what the protocol says about it.
The views showing it keep their own state in VIEW, and learn of
changes through ON-EVENT (called with the job and each event after
its state was updated) and ON-FINISH (called with the job once)."
  id question context description source-buffer connection options
  follow-up parts
  (state 'connecting) phase (iteration 0) (sub-calls 0) (subcall-events 0)
  tokens cost start-time end-time answer result error partial
  finished reply callback view on-event on-finish)

(defun rlm-job-running-p (job)
  "Return non-nil if JOB has not finished."
  (not (rlm-job-finished job)))

(defun rlm-job-elapsed (job)
  "Return the seconds JOB has run (until now or its end)."
  (if (rlm-job-start-time job)
      (- (or (rlm-job-end-time job) (float-time)) (rlm-job-start-time job))
    0))

(defun rlm-job-finish-kind (job)
  "Return how JOB's answer came: \"final\", \"cached\", \"best_effort\"..."
  (plist-get (rlm-job-result job) :finish))

(defun rlm-job-cached-p (job)
  "Return non-nil if JOB's answer came from the daemon's cache."
  (or (equal (rlm-job-finish-kind job) "cached")
      (eq (plist-get (rlm-job-result job) :cached) t)))

(defun rlm-job-best-effort-p (job)
  "Return non-nil if a budget (iterations, time) forced JOB's answer."
  (member (rlm-job-finish-kind job) '("best_effort" "timeout")))

(defun rlm-job-unsupported-p (job)
  "Return non-nil if the daemon found no span backing JOB's answer."
  (eq (plist-get (rlm-job-result job) :supported) :json-false))

(defun rlm-job-sources (job)
  "Return the sources of JOB's answer, a list of plists."
  (append (plist-get (rlm-job-result job) :sources) nil))

(defun rlm-job-model (job)
  "Return the root model of JOB, or nil for the daemon's default."
  (let ((m (or (plist-get (rlm-job-result job) :root_model)
               (plist-get (rlm-job-options job) :root_model))))
    (and (stringp m) (not (string-empty-p m)) m)))

;;;; Socket and connection

(defun rlm-default-socket-path ()
  "Return the default socket path, as the daemon computes it.
This follows the daemon: $RLMD_SOCKET, else the rlmd directory in
the user's runtime directory ($XDG_RUNTIME_DIR, else /run/user/UID
when it is a directory we own, else TMPDIR/runtime-UID)."
  (let ((env (getenv "RLMD_SOCKET"))
        (xdg (getenv "XDG_RUNTIME_DIR"))
        (run (format "/run/user/%d" (user-uid))))
    (cond
     ((and env (not (string-empty-p env))) env)
     (t
      (expand-file-name
       "rlmd/rlmd.sock"
       (cond ((and xdg (not (string-empty-p xdg))) xdg)
             ;; platformdirs takes /run/user/UID only when it is a real
             ;; directory of ours with mode 0700.
             ((and (file-directory-p run)
                   (not (file-symlink-p run))
                   (eql (file-attribute-user-id (file-attributes run 'integer))
                        (user-uid))
                   (eql (logand (or (file-modes run) 0) #o777) #o700))
              run)
             (t (expand-file-name
                 (format "runtime-%d" (user-uid))
                 ;; Python's tempfile.gettempdir(), for writable directories.
                 (or (cl-find-if (lambda (d) (and d (not (string-empty-p d))
                                                  (file-directory-p d)
                                                  (file-writable-p d)))
                                 (list (getenv "TMPDIR") (getenv "TEMP") (getenv "TMP")))
                     "/tmp")))))))))

(defun rlm-socket ()
  "Return the socket path in use: `rlm-socket-path' or the default."
  (expand-file-name (or rlm-socket-path (rlm-default-socket-path))))

(defun rlm--replace-nul-escapes (string)
  "Return STRING, JSON text, with every \\u0000 escape made \\ufffd.
Both escapes are six bytes long, so Content-Length stays right."
  (if (not (string-search "u0000" string))
      string
    (replace-regexp-in-string
     "\\\\+u0000"
     (lambda (match)
       ;; An odd run of backslashes ends in an escape; an even one is
       ;; escaped backslashes followed by the letters u0000.
       (if (cl-oddp (- (length match) 5))
           (concat (substring match 0 -5) "ufffd")
         match))
     string t t)))

(defun rlm--nul-safe-filter (filter)
  "Return a process filter passing text to FILTER without \\u0000 escapes.
Emacs 28 cannot parse JSON holding \\u0000 (jsonrpc.el then drops the
whole message, so a reply would never arrive); U+FFFD replaces it.
An escape split between two reads is held back until the next one."
  (let ((pending ""))
    (lambda (proc string)
      (let* ((text (concat pending string))
             (cut (if (string-match "\\\\+\\(?:u0?0?0?\\)?\\'" text)
                      (match-beginning 0)
                    (length text))))
        (setq pending (substring text cut))
        (funcall filter proc (rlm--replace-nul-escapes (substring text 0 cut)))))))

(defun rlm--make-connection (process)
  "Wrap PROCESS, a connected socket, in a jsonrpc connection."
  (let* ((args (list :name "rlm"
                     :process (lambda () process)
                     :notification-dispatcher #'rlm--dispatch-notification
                     :request-dispatcher #'ignore
                     :on-shutdown #'rlm--on-shutdown))
         (conn
          ;; jsonrpc 1.0.20 (Emacs 30) renamed the log size initarg and
          ;; warns about the old one; Emacs 28's jsonrpc knows only that.
          (condition-case nil
              (apply #'make-instance 'jsonrpc-process-connection
                     :events-buffer-config (list :size rlm-events-buffer-size) args)
            (invalid-slot-name
             (apply #'make-instance 'jsonrpc-process-connection
                    :events-buffer-scrollback-size rlm-events-buffer-size args)))))
    (set-process-filter process (rlm--nul-safe-filter (process-filter process)))
    conn))

(defun rlm--try-connect (path)
  "Connect to the daemon on PATH; return a connection or nil."
  (when (file-exists-p path)
    (condition-case nil
        (rlm--make-connection
         (make-network-process :name "rlm" :family 'local :service path
                               :noquery t :coding 'utf-8-unix))
      (file-error nil))))

(defun rlm--daemon-output (buffer)
  "Return the last line of BUFFER, the daemon's output."
  (if (buffer-live-p buffer)
      (with-current-buffer buffer
        (let ((text (string-trim (buffer-string))))
          (if (string-empty-p text) "no output"
            (car (last (split-string text "\n" t))))))
    "no output"))
(defun rlm--daemon-filter (proc string)
  "Append STRING, output of the daemon PROC, to its buffer and log file."
  (let ((buf (process-buffer proc)))
    (when (buffer-live-p buf)
      (with-current-buffer buf
        (save-excursion
          (goto-char (point-max))
          (insert string)
          ;; A long-lived daemon logs forever; keep the last 64 KiB here
          ;; (the log file has it all).
          (when (> (buffer-size) 131072)
            (delete-region (point-min) (- (point-max) 65536)))))))
  (when rlm-daemon-log-file
    (let ((coding-system-for-write 'utf-8-unix))
      (ignore-errors
        (write-region string nil rlm-daemon-log-file t 'silent)))))

(defun rlm--rotate-daemon-log ()
  "Keep the previous daemon run's log as the log file plus \".old\"."
  (when (and rlm-daemon-log-file (file-exists-p rlm-daemon-log-file))
    (ignore-errors
      (rename-file rlm-daemon-log-file (concat rlm-daemon-log-file ".old") t))))

(defun rlm--start-daemon (path)
  "Start the daemon on socket PATH and return a connection to it.
Waits at most `rlm-daemon-start-timeout' seconds; signals
`rlm-error' saying why when the daemon does not answer."
  (unless rlm-daemon-command
    (rlm--signal "no daemon answers on %s (start one with `rlmd', or set `rlm-daemon-command')"
                 path))
  (unless (executable-find (car rlm-daemon-command))
    (rlm--signal "cannot start the daemon: `%s' is not an executable program (install rlmd or set `rlm-daemon-command')"
                 (car rlm-daemon-command)))
  (let* ((command (append rlm-daemon-command (list "--socket" path)))
         (out (get-buffer-create " *rlmd*"))
         (proc
          (condition-case err
              ;; A local directory, even when the current buffer is remote.
              (let ((default-directory (expand-file-name "~/")))
                (rlm--rotate-daemon-log)
                (with-current-buffer out
                  (let ((inhibit-read-only t))
                    (goto-char (point-max))
                    (unless (bobp)
                      (insert (format "\n--- a new daemon started at %s ---\n"
                                      (format-time-string "%F %T"))))))
                (make-process :name "rlmd" :buffer out :command command
                              :noquery t :connection-type 'pipe
                              :filter #'rlm--daemon-filter
                              :sentinel #'ignore))
            (error
             (rlm--signal "cannot start the daemon with `%s': %s (set `rlm-daemon-command')"
                          (string-join command " ") (error-message-string err)))))
         (deadline (+ (float-time) rlm-daemon-start-timeout))
         conn)
    (setq rlm--daemon-process proc)
    (message "rlm: starting the daemon (%s)..." (car command))
    (while (and (not (setq conn (rlm--try-connect path)))
                (process-live-p proc)
                (< (float-time) deadline))
      (accept-process-output proc 0.1))
    (setq conn (or conn (rlm--try-connect path)))    ; one last look
    (if conn
        (progn (message nil) conn)
      (let ((why (if (process-live-p proc)
                     (progn (delete-process proc)
                            (format "no answer on %s after %s s"
                                    path rlm-daemon-start-timeout))
                   (format "`%s' exited with status %s: %s"
                           (string-join command " ")
                           (process-exit-status proc)
                           (rlm--daemon-output out)))))
        (message nil)
        (rlm--signal "the daemon did not start: %s (its log: M-x rlm-daemon-log)" why)))))

(defun rlm-stop-daemon (&optional timeout)
  "Stop the daemon Emacs started, waiting at most TIMEOUT seconds.
SIGTERM makes the daemon drain: queries in flight may finish (up to
its --drain-timeout, 30 s by default) before it exits.  Return
non-nil when it stopped."
  (interactive)
  (let ((proc rlm--daemon-process)
        (timeout (or timeout 35)))
    (unless (process-live-p proc)
      (user-error "No daemon started by this Emacs is running"))
    (rlm-disconnect)
    (signal-process proc 'TERM)
    (let ((deadline (+ (float-time) timeout))
          (t0 (float-time)))
      (while (and (process-live-p proc) (< (float-time) deadline))
        (message "rlm: the daemon is draining: queries in flight may finish first (up to its --drain-timeout, 30 s by default); %.0f s so far"
                 (- (float-time) t0))
        (accept-process-output proc 0.5))
      (message (if (process-live-p proc)
                   "rlm: the daemon is still draining; see M-x rlm-daemon-log"
                 "rlm: the daemon stopped"))
      (not (process-live-p proc)))))

(defun rlm-connection ()
  "Return a live connection to the daemon.
Connect to the socket of `rlm-socket'; when nothing answers there,
start the daemon with `rlm-daemon-command' and wait (bounded) for it."
  (if (and rlm--connection (jsonrpc-running-p rlm--connection))
      rlm--connection
    (let ((path (rlm-socket)))
      (setq rlm--connection
            (or (rlm--try-connect path)
                (rlm--start-daemon path))))))

(defun rlm-disconnect ()
  "Close the connection to the daemon, leaving the daemon running."
  (interactive)
  (when rlm--connection
    (let ((conn rlm--connection))
      (setq rlm--connection nil)
      (ignore-errors (jsonrpc-shutdown conn t)))))

(defun rlm--on-shutdown (conn)
  "Forget CONN when its socket closes and fail the jobs it carried."
  (when (eq conn rlm--connection)
    (setq rlm--connection nil))
  (dolist (job (hash-table-values rlm--jobs))
    (when (eq (rlm-job-connection job) conn)
      (rlm--job-finish job 'error "the connection to the daemon was lost"))))

(defun rlm--error-message (err)
  "Return a readable message from ERR, a jsonrpc error plist or condition."
  (cond
   ((and (consp err) (keywordp (car err)))
    (let ((msg (plist-get err :message))
          (kind (plist-get (plist-get err :data) :kind)))
      (concat (or msg "unknown error")
              (if (and kind (stringp kind)) (format " [%s]" kind) ""))))
   ((eq (car-safe err) 'jsonrpc-error)
    (or (alist-get 'jsonrpc-error-message (cdr err))
        (format "%s" (cdr err))))
   (t (error-message-string err))))


(defun rlm-request (method &optional params timeout)
  "Call METHOD (a symbol such as `context/list') with PARAMS and wait.
PARAMS is a plist; nil sends an empty object.  TIMEOUT defaults to
`rlm-request-timeout'.  Return the result; signal `rlm-error' with
the daemon's message on failure."
  (let ((conn (rlm-connection)))
    (condition-case err
        (jsonrpc-request conn method (or params (make-hash-table))
                         :timeout (or timeout rlm-request-timeout))
      (jsonrpc-error
       (rlm--signal "%s: %s" method (rlm--error-message err))))))

(defun rlm--new-job-id ()
  "Return a fresh job id."
  (format "emacs-%d-%d-%04x" (emacs-pid) (cl-incf rlm--job-counter) (random 65536)))

(defvar rlm--listeners (make-hash-table :test #'equal)
  "Job ids that are not queries (improvement cycles) to their event function.")

(defun rlm-listen (job-id function)
  "Call FUNCTION with the params of each `query/event' of JOB-ID.
For jobs that are not queries, such as improvement cycles; nil
FUNCTION stops listening."
  (if function (puthash job-id function rlm--listeners)
    (remhash job-id rlm--listeners)))

(defun rlm--dispatch-notification (_conn method params)
  "Route notification METHOD with PARAMS to its job."
  (when (eq method 'query/event)
    (let* ((id (plist-get params :job))
           (job (gethash id rlm--jobs))
           (listener (gethash id rlm--listeners)))
      (condition-case err
          (cond ((and job (not (rlm-job-finished job))) (rlm--job-event job params))
                (listener (funcall listener params)))
        (error (message "rlm: bad event %S: %s" (plist-get params :kind)
                        (error-message-string err)))))))

;;;; The protocol state machine: one handler per event kind

(defun rlm--event-root-delta (job _ev)
  "Record that the root model streams text for JOB."
  (setf (rlm-job-state job) 'thinking
        (rlm-job-phase job) nil))

(defun rlm--event-code (job _ev)
  "Record that JOB is running a block."
  (setf (rlm-job-state job) 'running-code
        (rlm-job-phase job) nil))

(defun rlm--event-output (job _ev)
  "Record that a block of JOB printed something for the root model."
  (setf (rlm-job-state job) 'thinking))

(defun rlm--event-subcall (job ev)
  "Count a sub-call of JOB (EV has its status)."
  (when (member (plist-get ev :status) '(nil "start"))
    (cl-incf (rlm-job-subcall-events job))
    (setf (rlm-job-state job) 'sub-calls))
  ;; Until a progress event counts them, count the starts seen.
  (when (= (rlm-job-sub-calls job) 0)
    (setf (rlm-job-sub-calls job) (rlm-job-subcall-events job))))

(defun rlm--event-progress (job ev)
  "Update the counters of JOB from EV."
  (let ((iter (plist-get ev :iteration)))
    (when (numberp iter) (setf (rlm-job-iteration job) iter)))
  (when (numberp (plist-get ev :sub_calls))
    (setf (rlm-job-sub-calls job) (plist-get ev :sub_calls)))
  (when (plist-get ev :tokens) (setf (rlm-job-tokens job) (plist-get ev :tokens)))
  (when (numberp (plist-get ev :cost)) (setf (rlm-job-cost job) (plist-get ev :cost))))

(defun rlm--event-phase (job ev)
  "Record the phase JOB waits in before the first token (EV)."
  (setf (rlm-job-phase job) (rlm--plist :phase (plist-get ev :phase)
                                        :tokens (plist-get ev :tokens)
                                        :model (plist-get ev :model)
                                        :message (plist-get ev :message))))

(defun rlm--event-final (job ev)
  "Record the answer of JOB that EV carries."
  (let ((answer (plist-get ev :answer)))
    ;; Nested loops (rlm_query) end with finals of their own.
    (when (and (stringp answer) (not (rlm-job-answer job))
               (memq (plist-get ev :depth) '(nil 0 1)))
      (setf (rlm-job-answer job) answer))))

(defun rlm--event-error (job ev)
  "Record that JOB failed (EV: message, partial)."
  (setf (rlm-job-error job) (or (plist-get ev :message) "unknown error"))
  (when (plist-get ev :partial)
    (setf (rlm-job-partial job) (plist-get ev :partial))))

(defconst rlm--event-handlers
  '(("root_delta" . rlm--event-root-delta)
    ("code" . rlm--event-code)
    ("output" . rlm--event-output)
    ("subcall" . rlm--event-subcall)
    ("progress" . rlm--event-progress)
    ("phase" . rlm--event-phase)
    ("final" . rlm--event-final)
    ("error" . rlm--event-error))
  "Handler of each `query/event' kind: updates the job's protocol state.")

(defun rlm--job-event (job ev)
  "Apply event EV (a `query/event' params plist) to JOB, then tell its view."
  (let ((handler (cdr (assoc (plist-get ev :kind) rlm--event-handlers))))
    (when handler (funcall handler job ev))
    (when (rlm-job-on-event job)
      (funcall (rlm-job-on-event job) job ev))))

(defun rlm--job-succeeded (job result)
  "Finish JOB with RESULT, the response of `query/run'."
  (setf (rlm-job-reply job) (list :result result))
  (unless (rlm-job-finished job)
    (setf (rlm-job-result job) result)
    (when-let* ((tokens (plist-get result :tokens))) (setf (rlm-job-tokens job) tokens))
    (when (numberp (plist-get result :cost)) (setf (rlm-job-cost job) (plist-get result :cost)))
    (when (numberp (plist-get result :sub_calls))
      (setf (rlm-job-sub-calls job) (plist-get result :sub_calls)))
    (when (numberp (plist-get result :iterations))
      (setf (rlm-job-iteration job) (plist-get result :iterations)))
    (let ((answer (plist-get result :answer)))
      ;; The reply is the authority on the answer.
      (setf (rlm-job-answer job) (if (stringp answer) answer (format "%s" answer))))
    (rlm--job-finish job 'done)))

(defun rlm--job-failed (job err)
  "Finish JOB with ERR, a JSON-RPC error plist."
  (setf (rlm-job-reply job) (list :error err))
  (unless (rlm-job-finished job)
    (let ((partial (plist-get (plist-get err :data) :partial)))
      (when (stringp partial) (setf (rlm-job-partial job) partial)))
    (rlm--job-finish job (if (rlm-error-is err 'cancelled) 'cancelled 'error)
                     (if (rlm-error-is err 'connection-closed)
                         "the daemon closed the connection (it stopped or died); see M-x rlm-daemon-log"
                       (rlm--error-message err)))))

(defun rlm--job-finish (job status &optional message)
  "Mark JOB finished with STATUS (done, error or cancelled) and MESSAGE.
Does nothing when JOB already finished.  Then tell its view and
call its callback."
  (unless (rlm-job-finished job)
    (setf (rlm-job-finished job) t
          (rlm-job-state job) status
          (rlm-job-phase job) nil
          (rlm-job-end-time job) (float-time))
    (remhash (rlm-job-id job) rlm--jobs)
    (when message (setf (rlm-job-error job) message))
    (when (rlm-job-on-finish job)
      (with-demoted-errors "rlm: showing the end of a query failed: %S"
        (funcall (rlm-job-on-finish job) job)))
    (when (rlm-job-callback job)
      (with-demoted-errors "rlm: callback failed: %S"
        (funcall (rlm-job-callback job) job)))))

(cl-defun rlm-make-job (question &key context options follow-up callback
                                   on-event on-finish description source-buffer parts)
  "Make the `rlm-job' asking QUESTION; `rlm-run-job' sends it.
CONTEXT names a context the daemon holds; OPTIONS is the daemon's
options plist; FOLLOW-UP is the id of an earlier job whose question,
answer and sources the daemon shows the model.  CALLBACK, ON-EVENT
and ON-FINISH are the job's (see `rlm-job').  DESCRIPTION,
SOURCE-BUFFER and PARTS are kept on the job for its views."
  (let* ((conn (rlm-connection))
         (job (rlm--job-create :id (rlm--new-job-id) :question question
                               :context context :description description
                               :source-buffer source-buffer :parts parts
                               :options options :follow-up follow-up
                               :connection conn :callback callback
                               :on-event on-event :on-finish on-finish
                               :start-time (float-time))))
    (puthash (rlm-job-id job) job rlm--jobs)
    (push job rlm--recent-jobs)
    (when (> (length rlm--recent-jobs) 50)
      (setcdr (nthcdr 49 rlm--recent-jobs) nil))
    (setf (rlm-job-state job) 'thinking)
    job))

(defun rlm-run-job (job)
  "Send JOB, made by `rlm-make-job', to the daemon.
Its views were set up first, so that no event finds them missing."
  (condition-case err
      (jsonrpc-async-request
       (rlm-job-connection job) 'query/run
       (rlm--plist :query (rlm-job-question job) :context (rlm-job-context job)
                   :job (rlm-job-id job) :follow_up (rlm-job-follow-up job)
                   :options (rlm-job-options job))
       :success-fn (lambda (result) (rlm--job-succeeded job result))
       :error-fn (lambda (err) (rlm--job-failed job err))
       :timeout nil)
    (error
     (rlm--job-finish job 'error (format "could not send the query: %s"
                                         (error-message-string err)))))
  job)

(defun rlm-wait (job &optional timeout)
  "Wait until JOB finishes, at most TIMEOUT seconds (nil: no limit).
Quitting or timing out cancels JOB."
  (let ((deadline (and timeout (+ (float-time) timeout)))
        (ok nil))
    (unwind-protect
        (progn
          (while (and (rlm-job-running-p job)
                      (or (not deadline) (< (float-time) deadline)))
            (accept-process-output nil 0.05))
          (setq ok t))
      (when (rlm-job-running-p job)
        (rlm-cancel-job job (if ok "timed out" "quit"))))
    job))

(defun rlm--tell-daemon-cancel (job attempts)
  "Send `query/cancel' for JOB; ask again up to ATTEMPTS times while unknown.
A cancel can overtake its own `query/run' inside the daemon, which
then does not know the job yet; asking again shortly after settles it."
  (let ((conn (rlm-job-connection job)))
    (when (and conn (jsonrpc-running-p conn) (not (rlm-job-reply job)))
      (condition-case err
          (jsonrpc-async-request
           conn 'query/cancel (list :job (rlm-job-id job))
           :success-fn
           (lambda (result)
             (when (and (not (eq (plist-get result :cancelled) t))
                        (not (rlm-job-reply job))
                        (> attempts 0))
               (run-with-timer 0.5 nil #'rlm--tell-daemon-cancel job (1- attempts))))
           :error-fn #'ignore
           :timeout-fn #'ignore)
        (error (message "rlm: could not tell the daemon: %s" (error-message-string err)))))))

(defun rlm-cancel-job (job &optional reason)
  "Cancel JOB, telling the daemon; REASON is shown in its buffer.
The job ends at once on the Emacs side, whatever the daemon does."
  (when (rlm-job-running-p job)
    (rlm--tell-daemon-cancel job 10)
    (rlm--job-finish job 'cancelled reason)))

(defun rlm--running-jobs ()
  "Return the running jobs, newest first."
  (cl-remove-if-not #'rlm-job-running-p rlm--recent-jobs))


(defun rlm-job-age-string (job)
  "Return how long ago JOB started, e.g. \"3m\"."
  (let ((s (- (float-time) (or (rlm-job-start-time job) (float-time)))))
    (cond ((< s 60) (format "%ds" s))
          ((< s 3600) (format "%dm" (/ s 60)))
          (t (format "%dh" (/ s 3600))))))

(defun rlm-read-job (prompt jobs)
  "Read one of JOBS (newest first) with PROMPT; return it.
Candidates are job ids annotated with the state, age and question,
in the order given (newest first)."
  (let* ((alist (mapcar (lambda (j) (cons (rlm-job-id j) j)) jobs))
         (choice (completing-read prompt (rlm-job-completion-table jobs) nil nil)))
    (or (cdr (assoc choice alist)) choice)))

(defun rlm-job-completion-table (jobs)
  "Return a completion table of JOBS' ids, annotated, in their order."
  (let ((ids (mapcar #'rlm-job-id jobs)))
    (lambda (string pred action)
      (if (eq action 'metadata)
          `(metadata
            (category . rlm-job)
            (display-sort-function . identity)
            (cycle-sort-function . identity)
            (annotation-function
             . ,(lambda (id)
                  (let ((j (cl-find id jobs :key #'rlm-job-id :test #'equal)))
                    (if (not j) ""
                      (format "  %-10s %4s ago  %s"
                              (rlm-job-state j) (rlm-job-age-string j)
                              (rlm--truncate (rlm-job-question j) 60)))))))
        (complete-with-action action ids string pred)))))

;;;; Contexts

(defun rlm--sanitize-name (string)
  "Return STRING usable inside a context name."
  ;; The daemon takes any printable name of at most 256 characters.
  (let ((s (replace-regexp-in-string "[[:cntrl:]]+" " " string)))
    (cond ((string-empty-p s) "_")
          ((> (length s) 200)
           (concat (substring s 0 150) "…" (substring (secure-hash 'sha1 s) 0 12)))
          (t s))))


(defvar-local rlm--sent-contexts nil
  "Contexts sent from this buffer: alist of name to (TICK START END).")

(defvar rlm--created-contexts (make-hash-table :test #'equal)
  "Contexts this Emacs stored: name to the time it stored them.")

(defun rlm-context-created-here-p (name)
  "Return non-nil if this Emacs stored the context NAME."
  (gethash name rlm--created-contexts))

(defun rlm--context-exists-p (name)
  "Return non-nil if a context NAME exists in the daemon."
  (condition-case nil
      (progn (rlm-request 'context/info (list :name name)) t)
    (rlm-error nil)))

(defun rlm-put-text (name text &optional append)
  "Store TEXT as the daemon's context NAME (APPEND to it when non-nil).
Return the daemon's description of the context."
  (prog1
      (condition-case nil
          (rlm-request 'context/put (rlm--plist :name name :text text :append append)
                       rlm-put-timeout)
        ;; JSON carries Unicode only: raw bytes (a binary file, a bad
        ;; decoding) become U+FFFD, as a UTF-8 decoder would make them.
        (wrong-type-argument
         (rlm-request 'context/put
                      (rlm--plist :name name :append append
                                  :text (replace-regexp-in-string
                                         (format "[%c-%c]" #x3fff80 #x3fffff) "\ufffd" text t t))
                      rlm-put-timeout)))
    (puthash name (float-time) rlm--created-contexts)))

(defun rlm--put-via-file (name start end)
  "Store the current buffer from START to END as context NAME via a file.
Return non-nil on success, nil when the daemon could not use the file."
  (let ((file (make-temp-file "rlm-put-" nil ".txt")))
    (unwind-protect
        (condition-case err
            (progn
              (let ((coding-system-for-write 'utf-8-unix)
                    (write-region-inhibit-fsync t))
                (write-region start end file nil 'silent))
              (rlm-request 'context/put (list :name name :path file) rlm-put-timeout)
              t)
          (rlm-error
           (message "rlm: the daemon could not read %s (%s); sending the text instead"
                    file (error-message-string err))
           nil))
      (delete-file file))))


(defun rlm--drop-sent-contexts ()
  "Drop the contexts this buffer sent; for `kill-buffer-hook'.
Only over a live connection (killing a buffer never starts the
daemon), and without waiting for the answers."
  (when (and rlm-drop-contexts-on-kill rlm--sent-contexts
             rlm--connection (jsonrpc-running-p rlm--connection))
    (dolist (entry rlm--sent-contexts)
      (remhash (car entry) rlm--created-contexts)
      (ignore-errors
        (jsonrpc-async-request rlm--connection 'context/drop (list :name (car entry))
                               :success-fn #'ignore :error-fn #'ignore
                               :timeout-fn #'ignore)))))

(defun rlm-context-name (&optional buffer part)
  "Return the context name of BUFFER, or of its PART when non-nil.
PART is a stable label: an Org ID, an outline path, or \"region\";
names never carry positions, so that editing a buffer updates one
context instead of making a new one."
  (concat "emacs:" (rlm--sanitize-name (buffer-name (or buffer (current-buffer))))
          (if part (concat (if (string-prefix-p "#" part) "" ":")
                           (rlm--sanitize-name part))
            "")))

(defun rlm-buffer-context (&optional buffer start end part)
  "Send the text of BUFFER from START to END as a named context.
The whole (widened) buffer when START and END are nil.  PART labels
a part of the buffer (see `rlm-context-name'; default \"region\").
Return the context's name.  The text is sent only when it changed
since it was last sent (or the daemon lost it): the cache is keyed
by the buffer's modification tick and the part's bounds.  Killing
the buffer drops what it sent (`rlm-drop-contexts-on-kill')."
  (with-current-buffer (or buffer (current-buffer))
    (save-restriction
      (widen)
      (let* ((whole (and (or (null start) (= start (point-min)))
                         (or (null end) (= end (point-max)))))
             (start (or start (point-min)))
             (end (or end (point-max)))
             (name (rlm-context-name nil (and (not whole) (or part "region"))))
             (key (list (buffer-chars-modified-tick) start end))
             (cached (assoc name rlm--sent-contexts)))
        (unless (and cached (equal (cdr cached) key) (rlm--context-exists-p name))
          (when (> (- end start) 1000000)
            (message "rlm: sending %s (%s)..." name
                     (file-size-human-readable (- end start))))
          (unless (and rlm-file-transfer-threshold
                       (>= (- end start) rlm-file-transfer-threshold)
                       (rlm--put-via-file name start end))
            (rlm-put-text name (buffer-substring-no-properties start end)))
          (puthash name (float-time) rlm--created-contexts)
          (when (> (- end start) 1000000) (message nil))
          (add-hook 'kill-buffer-hook #'rlm--drop-sent-contexts nil t)
          (setf (alist-get name rlm--sent-contexts nil nil #'equal) key))
        name))))

(defun rlm-files-context (paths)
  "Have the daemon read PATHS (files or directories) into one context.
Return the context's name."
  (let* ((paths (mapcar (lambda (p) (directory-file-name (expand-file-name p))) paths))
         (name (concat "files:"
                       (rlm--sanitize-name
                        (if (cdr paths)
                            (format "%s+%d" (abbreviate-file-name (car paths))
                                    (1- (length paths)))
                          (abbreviate-file-name (car paths))))))
         (first t))
    (dolist (p paths)
      (when (file-remote-p p)
        (rlm--signal "%s is remote; the daemon reads local files only" p))
      (unless (file-exists-p p)
        (rlm--signal "%s does not exist" p)))
    (message "rlm: the daemon is reading %s..." (string-join paths ", "))
    (unwind-protect
        (dolist (p paths)
          (rlm-request 'context/put (rlm--plist :name name :path p :append (not first))
                       rlm-put-timeout)
          (setq first nil))
      ;; The progress message must not outlive the work.
      (message nil))
    (puthash name (float-time) rlm--created-contexts)
    name))

(defun rlm-context-names ()
  "Return the names of the daemon's contexts."
  (mapcar (lambda (c) (plist-get c :name)) (rlm-request 'context/list)))

(defun rlm-drop (name)
  "Drop the daemon's context NAME."
  (interactive (list (completing-read "Drop context: " (rlm-context-names) nil t)))
  (remhash name rlm--created-contexts)
  (plist-get (rlm-request 'context/drop (list :name name)) :dropped))

(provide 'rlm-client)
;;; rlm-client.el ends here
